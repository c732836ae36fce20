#!/bin/bash
# What a session with the GPU machine checks and measures, one stage per call of the device tool (10 minutes each):
#   suite        the GPU suite (SLIDE_TEST_ACCELERATOR=gpu) of tests/core, each test under a timeout
#   peers        bench_peers at 3B batch 8 and 8B batch 4 under the 24 GiB cap: slideformer (default options and
#                +bf16moments) against the tuned peers, side by side
#   host         bench_host_adamw: fused fp32 AdamW against bf16 moments on this host
#   lora         the LoRA r=16 benchmark at the 8B shape against the full fine-tune
#   convergence  benchmarks/convergence.py (115M model, 200 steps; plain, slideformer, +bf16moments)
#   before_after the engine before its split (commit 4c29062, unpacked into before/ here:
#                git archive 4c29062 lightning_slide | tar -x -C before) against now: 3B batch 8, 8B batch 4
# From the device tool: run(command="bash benchmarks/gpu_session.sh peers", carry=[".whl", "before"]), with .whl/
# made by ../shared/tools/device-wheels.sh peft==0.21.2 accelerate==1.16.0 psutil matplotlib (WITH_DEEPSPEED=1 for
# the DeepSpeed rows). Logs and tables go to $OUT/<stage>.log; record them in BENCHMARKS.md with the commit.
set -u
stage=${1:?stage: suite, peers, host, lora, convergence or before_after}
out=${OUT:-/tmp/out}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$PWD/.site" .whl/*.whl \
  || exit 1
export PYTHONPATH="$PWD/.site:$PWD"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$out/machine.txt"
lscpu | grep -E "Model name|^CPU\(s\)" >> "$out/machine.txt"
case $stage in
  suite)
    SLIDE_TEST_ACCELERATOR=gpu timeout 560 python3 -m pytest -q -x --timeout 120 tests/core -p no:cacheprovider \
      > "$out/suite.log" 2>&1 ;;
  peers)
    timeout 580 python3 benchmarks/bench_peers.py --shapes llama3_2_3b:8,llama3_1_8b:4 --steps 3 --cap 24GiB \
      --systems all_on_gpu,slideformer,slideformer+bf16moments,fsdp_offload,deepspeed_offload,zenflow \
      > "$out/peers.log" 2>&1 ;;
  host)
    timeout 580 python3 benchmarks/bench_host_adamw.py --threads 8,16 > "$out/host.log" 2>&1 ;;
  lora)
    timeout 580 python3 benchmarks/bench_peers.py --shapes llama3_1_8b:4 --steps 3 --cap 24GiB \
      --systems slideformer,slideformer+lora16 > "$out/lora.log" 2>&1 ;;
  convergence)
    timeout 580 python3 benchmarks/convergence.py --out "$out/convergence" > "$out/convergence.log" 2>&1 ;;
  before_after)
    for code in before now before now; do
      path=$PWD; [ "$code" = before ] && path=$PWD/before
      PYTHONPATH="$PWD/.site:$path" timeout 140 python3 benchmarks/bench_peers.py \
        --shapes llama3_2_3b:8,llama3_1_8b:4 --steps 3 --cap 24GiB --systems slideformer >> "$out/before_after.log" 2>&1
      echo "^^^ $code" >> "$out/before_after.log"
    done ;;
  *) echo "unknown stage $stage" >&2; exit 2 ;;
esac
tail -40 "$out/$stage.log"
