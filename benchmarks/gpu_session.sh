#!/bin/bash
# What a session with the GPU machine checks and measures, stages run in the order given. A call of the device tool
# has 10 minutes and a session 30 (a cold start takes 2-3 of them); one bench_peers child takes ~60 s at 3B and
# ~130 s at 8B, so each stage below fits one call (with its neighbour where said). In order of need:
#   order8b16 (~500 s), convergence32, bytes8b (~280 s), defaults3b (~450 s); measured already
#   (BENCHMARKS.md): accum3b (~320 s), fsdp2 (~460 s on an H100 machine), peers8b16 (~350 s),
#   headline (~390 s), peers8b (~540 s on an H200 machine), peers3b (~350 s),
#   zenflow3b's sequential row (~75 s), qwen14b (~400 s with QWEN14B_STEPS=3; needs datasets,
#   dill and multiprocess in .whl, not pyarrow: see below), suite (~230-360 s), gradnorm3b (~120 s), convergence
#   (~350 s), plan (~90 s), clipped3b, before_after, levers3b, gil, lora, hostadamw. Rows ran ~1.7x as long on
#   session 12's H200 machine as on the H100 ones: give a stage's timeouts room.
#   suite        the GPU suite (SLIDE_TEST_ACCELERATOR=gpu) of tests/core, each test under a timeout (a call of its own);
#                SUITE_PATHS=... SUITE_TIMEOUT=... run a part of it beside another stage
#   hostadamw    the host optimizer (bench_host_adamw: fused fp32 against bf16 moments on this host; bf16 gradients
#                and the compute copy written by the kernel; alone and under
#                copies to and from the GPU (does the memory bus bind the update in a step?); clipping by
#                norm in a pass of its own against folded into the kernel)
#   gil          how long a thread waits for the GIL while another runs Python between short calls (bench_gil, ~30 s)
#   peers3b      bench_peers at 3B batch 8 under the 24 GiB cap: slideformer (default options, no layer kept on
#                the GPU as was the default before session 7, bf16 moments with the compute copy) against the tuned
#                peers but ZenFlow (too slow to start to fit beside them in one call: zenflow3b)
#   zenflow3b    3B batch 8: ZenFlow with its host step in the training process (+sequential) and overlapped in a
#                process of its own (the tutorial's; killed on this host in session 8), tuned FSDP offload
#   defaults3b   3B batch 8: slideformer's defaults (AdamW's host loop reading bf16 gradients), with the compute copy
#                the loop writes (host_weights="compute"), each also with no layer kept on the GPU (device_layers=0,
#                the default before session 7), and bf16 moments with the copy, against tuned FSDP offload (~450 s)
#   headline     the rows issue 18's targets turn on, in one call (~540 s): 3B batch 8 defaults (device_layers
#                "auto" since session 7), the old default (+dev0), bf16 moments + compute copy, tuned FSDP offload;
#                8B batch 4 defaults and bf16 moments + compute copy
#   plan         the planner's bound (now with the host memory term) against the measured step, GPU and host peaks:
#                bench_plan at 3B batch 8 and 8B batch 4 under the cap, default options
#   peers8b      8B batch 4 in one run: slideformer (defaults; bf16 moments with the compute copy the loop writes)
#                against tuned FSDP offload and DeepSpeed, and all-on-GPU on a card that holds it (~140 GB)
#   fsdp2        FSDP2 with CPUOffloadPolicy (the row fsdp2_offload) against FSDP1's (fsdp_offload) and slideformer's
#                defaults at 3B batch 8, and against slideformer with bf16 moments at 8B batch 4, where FSDP1 runs out
#                of GPU memory under the cap (~470 s on an H200 machine)
#   peers8b16    8B batch 16, where the GPU's share grows: slideformer (defaults; bf16 moments with the compute copy,
#                and without it: 2 bytes per parameter fewer in the host's pass for uploads twice as large, which
#                batch 16 leaves time for) against forward and backward alone (gpu_compute, the bound's GPU term), and
#                all-on-GPU where it fits (~550 s on an H200 machine)
#   accum3b      3B, 4 micro-batches of 2 per step clipped by norm at 1.0 (the README's example): the norm from the
#                host's last sum (now) against the engine before it (a pass of its own after the backward: before/ =
#                git archive 58eb7b7 lightning_slide | tar -x -C before; carry "before"), and tuned FSDP offload
#   gradnorm3b   3B batch 8, slideformer's defaults: without the gradient norm, with GradNormMonitor logging it at
#                every step, with Lightning's documented hook (grad_norm(self) in on_before_optimizer_step) (~200 s)
#   bytes8b      8B batch 4 with bf16 moments, uploads from the fp32 masters against the bf16 compute copy the
#                kernel now writes in its pass (host_weights="compute": 4 bytes per parameter fewer copied)
#   clipped3b    3B batch 8 clipped by norm at 1.0 (as most fine-tunes run): slideformer (defaults, bf16 moments)
#                against tuned FSDP offload, whose clipping is a pass of its own over the host's gradients
#   levers3b     3B batch 8, slideformer with host-side levers the host idle might answer to (BENCHMARKS.md): huge
#                pages for host memory (+thp), 14 of 16 threads for the host AdamW (+threads14), both; each row
#                also says how long a thread waits for the GIL (GilProbe)
#   lora         the LoRA r=16 benchmark at the 8B shape against the full fine-tune
#   convergence  benchmarks/convergence.py (115M model, 200 steps; plain, slideformer, +bf16moments)
#   convergence32 the same in fp32 (32-true both): is bf16's steady gap to plain (session 8) precision's alone?
#   qwen14b      a Qwen3-14B-shape model (random weights, the shipped tokenizer and data) trained for a few steps
#                under the 24 GiB cap with the options slide-plan picks for this machine (masters on disk, bf16
#                moments, clipping by value): slide-plan's prediction first (rates measured here), then the run's
#                tokens/s, peak host RSS and disk use
#   order8b16    8B batch 16, bf16 moments with the compute copy, 12 gradient buffers: the host's updates in the
#                order their gradients land (now) against the landed one the next forward needs first
#                (benchmarks/patches/updates-needed-first.patch; session 12's pair was not conclusive), alternating,
#                5 timed steps a row (~500 s on an H200 machine)
#   before_after the engine before its split (commit 4c29062, unpacked into before/ here:
#                git archive 4c29062 lightning_slide | tar -x -C before) against now, at $BEFORE_AFTER_SHAPES
#                (default 8B batch 4: the 3B batch-8 pair is in BENCHMARKS.md), both without parking (the
#                default then; "auto" since) and now without layers kept on the GPU (the default since session 7)
# From the device tool: run(command="bash benchmarks/gpu_session.sh peers3b", carry=[".whl", "before"]), with .whl/
# made by ../shared/tools/device-wheels.sh datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 (WITH_DEEPSPEED=1 for
# the DeepSpeed rows; the machine has peft, accelerate, psutil, pyarrow and matplotlib). Logs and tables go to
# $OUT/<stage>.log; record them in BENCHMARKS.md with the commit.
set -u
[ $# -gt 0 ] || { echo "stages: suite, fsdp2, gil, hostadamw, headline, defaults3b, plan, peers3b, zenflow3b, accum3b, gradnorm3b, peers8b, order8b16, bytes8b, peers8b16, clipped3b, levers3b, lora, convergence, convergence32, qwen14b, before_after" >&2; exit 2; }
out=${OUT:-/tmp/out}
mkdir -p "$out"
# hydra-core and datasets for the app (qwen14b), DeepSpeed for its rows. Not pyarrow: datasets hashes its tables with
# dill, which pickles by value any module outside the interpreter's prefix, and pyarrow's types cannot be (the
# machine's own pyarrow, inside it, is used)
if ls .whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$PWD/.site" \
    .whl/*.whl || exit 1
fi
export PYTHONPATH="$PWD/.site:$PWD"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$out/machine.txt"
lscpu | grep -E "Model name|^CPU\(s\)" >> "$out/machine.txt"
python3 -c "import torch, lightning, transformers; print(torch.__version__, lightning.__version__, transformers.__version__)" \
  >> "$out/machine.txt" 2>&1
for stage in "$@"; do
case $stage in
  suite)
    SLIDE_TEST_ACCELERATOR=gpu timeout "${SUITE_TIMEOUT:-560}" python3 -m pytest -q --timeout 120 -p no:cacheprovider \
      ${SUITE_PATHS:-tests/core} \
      > "$out/suite.log" 2>&1 ;;
  gil)
    timeout 120 python3 benchmarks/bench_gil.py > "$out/gil.log" 2>&1 ;;
  hostadamw)
    timeout 280 python3 benchmarks/bench_host_adamw.py --numel 110e6 --threads 8,16 > "$out/hostadamw.log" 2>&1 ;;
  peers3b)
    systems=all_on_gpu,slideformer,slideformer+dev0,slideformer+bf16moments+bf16,fsdp_offload,deepspeed_offload
    timeout 580 python3 benchmarks/bench_peers.py --shapes llama3_2_3b:8 --steps 3 --cap 24GiB --timeout 150 \
      --systems $systems > "$out/$stage.log" 2>&1 ;;
  plan)
    for shape in llama3_2_3b:8 llama3_1_8b:4; do
      timeout 280 python3 benchmarks/bench_plan.py --shapes "${shape%:*}" --batch "${shape#*:}" --cap 24GiB \
        --timeout 250 >> "$out/plan.log" 2>&1
    done ;;
  defaults3b)
    timeout 580 python3 benchmarks/bench_peers.py --shapes llama3_2_3b:8 --steps 3 --cap 24GiB --timeout 150 \
      --systems slideformer,slideformer+bf16,slideformer+dev0,slideformer+dev0+bf16,slideformer+bf16moments+bf16,fsdp_offload \
      > "$out/$stage.log" 2>&1 ;;
  headline)
    timeout 290 python3 benchmarks/bench_peers.py --shapes llama3_2_3b:8 --steps 3 --cap 24GiB --timeout 100 \
      --systems slideformer,slideformer+dev0,slideformer+bf16moments+bf16,fsdp_offload > "$out/$stage.log" 2>&1
    timeout 270 python3 benchmarks/bench_peers.py --shapes llama3_1_8b:4 --steps 3 --cap 24GiB --timeout 150 \
      --systems slideformer,slideformer+bf16moments+bf16 >> "$out/$stage.log" 2>&1 ;;
  fsdp2)
    for item in llama3_2_3b:8:slideformer,fsdp_offload,fsdp2_offload llama3_1_8b:4:slideformer+bf16moments+bf16,fsdp2_offload; do
      timeout 290 python3 benchmarks/bench_peers.py --shapes "${item%:*}" --steps 3 --cap 24GiB --timeout 200 \
        --systems "${item##*:}" >> "$out/fsdp2.log" 2>&1
    done ;;
  peers8b|peers8b16)
    # all on the GPU at 8B holds 16 bytes per parameter (128 GB) beside its activations: only a card of ~140 GB;
    # ZenFlow holds ~25 GiB of host memory per billion parameters (3B, session 11): no fit at 8B on 125 GiB
    ceiling=; [ "$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)" -gt 120000 ] && ceiling=all_on_gpu,
    if [ "$stage" = peers8b ]; then shape=llama3_1_8b:4 systems=${ceiling}slideformer,slideformer+bf16moments+bf16,fsdp_offload,deepspeed_offload
    else shape=llama3_1_8b:16 systems=gpu_compute,${ceiling}slideformer,slideformer+bf16moments+bf16,slideformer+bf16moments; fi
    timeout 580 python3 benchmarks/bench_peers.py --shapes $shape --steps 3 --cap 24GiB --timeout 200 \
      --systems $systems > "$out/$stage.log" 2>&1 ;;
  zenflow3b)
    timeout 580 python3 benchmarks/bench_peers.py --shapes llama3_2_3b:8 --steps 3 --cap 24GiB --timeout 250 \
      --systems zenflow+sequential,zenflow,fsdp_offload > "$out/zenflow3b.log" 2>&1 ;;
  accum3b)
    # the README's example step: 4 micro-batches per step, clipped by norm at 1.0
    for code in before now; do
      path=$PWD; [ "$code" = before ] && path=$PWD/before
      PYTHONPATH="$PWD/.site:$path" timeout 200 python3 benchmarks/bench_peers.py --timeout 180 \
        --shapes llama3_2_3b:2 --accumulate 4 --clip 1.0 --steps 3 --cap 24GiB --systems slideformer \
        >> "$out/accum3b.log" 2>&1
      echo "^^^ $code" >> "$out/accum3b.log"
    done
    timeout 200 python3 benchmarks/bench_peers.py --timeout 180 --shapes llama3_2_3b:2 --accumulate 4 --clip 1.0 \
      --steps 3 --cap 24GiB --systems fsdp_offload >> "$out/accum3b.log" 2>&1 ;;
  gradnorm3b)
    timeout 580 python3 benchmarks/bench_peers.py --shapes llama3_2_3b:8 --steps 3 --cap 24GiB --timeout 150 \
      --systems slideformer,slideformer+gradnorm,slideformer+normhook > "$out/gradnorm3b.log" 2>&1 ;;
  bytes8b)
    timeout 580 python3 benchmarks/bench_peers.py --shapes llama3_1_8b:4 --steps 3 --cap 24GiB --timeout 250 \
      --systems slideformer+bf16moments,slideformer+bf16moments+bf16 > "$out/bytes8b.log" 2>&1 ;;
  clipped3b)
    timeout 580 python3 benchmarks/bench_peers.py --shapes llama3_2_3b:8 --steps 3 --cap 24GiB --timeout 150 \
      --clip 1.0 --systems slideformer,slideformer+bf16moments,fsdp_offload > "$out/clipped3b.log" 2>&1 ;;
  levers3b)
    timeout 300 python3 benchmarks/bench_peers.py --shapes llama3_2_3b:8 --steps 3 --cap 24GiB \
      --timeout 150 --systems slideformer,slideformer+thp,slideformer+threads14,slideformer+thp+threads14 \
      > "$out/levers3b.log" 2>&1 ;;
  lora)
    timeout 580 python3 benchmarks/bench_peers.py --shapes llama3_1_8b:4 --steps 3 --cap 24GiB \
      --systems slideformer,slideformer+lora16 > "$out/lora.log" 2>&1 ;;
  convergence)
    timeout 580 python3 benchmarks/convergence.py --out "$out/convergence" > "$out/convergence.log" 2>&1 ;;
  convergence32)
    timeout 580 python3 benchmarks/convergence.py --runs plain32,slideformer32 --out "$out/convergence32" \
      > "$out/convergence32.log" 2>&1 ;;
  qwen14b)
    shape="model.tokenizer=\${slide.asset:tokenizer} +model.config.model_type=qwen3 +model.config.hidden_size=5120"
    shape="$shape +model.config.num_hidden_layers=40 +model.config.intermediate_size=17408"
    shape="$shape +model.config.num_attention_heads=40 +model.config.num_key_value_heads=8 +model.config.head_dim=128"
    shape="$shape +model.config.vocab_size=151936 +model.config.tie_word_embeddings=false"
    run="model=causal_lm model.path=null $shape model.moments=bf16 kernels=all data.batch_size=8 data.max_length=1024"
    run="$run strategy.gpu_memory_limit=24GiB strategy.offload_dir=/tmp/slide-14b strategy.offload=masters"
    run="$run trainer.gradient_clip_algorithm=value trainer.max_steps=${QWEN14B_STEPS:-4} trainer.limit_val_batches=0"
    run="$run export.enabled=false"
    # no checkpoint (fp32 weights and moments would not fit beside the masters on this disk); every step logged
    # the run directory (its per-step CSV log) under $out, so what a run cut by the timeout logged still comes back
    run="$run callbacks=none +trainer.enable_checkpointing=false trainer.log_every_n_steps=1 hydra.run.dir=$out/run-14b"
    run="$run +logger.csv.flush_logs_every_n_steps=1"
    { python3 -m lightning_slide.app.plan $run plan.disk_free=60GB plan.measure=true; echo "plan exit $?";
      # the disk tier's peak use, sampled every 5 s while the run goes
      ( peak=0; while sleep 5; do used=$(du -sb /tmp/slide-14b 2>/dev/null | cut -f1)
          [ "${used:-0}" -gt "$peak" ] && peak=$used && echo "$peak" > "$out/qwen14b-disk-peak.txt"; done ) &
      sampler=$!
      timer=""; [ -x /usr/bin/time ] && timer="/usr/bin/time -v"  # its peak RSS; the app's summary says it too
      $timer timeout "${QWEN14B_TIMEOUT:-520}" python3 -m lightning_slide.app.train $run 2>&1 | grep --line-buffered \
        -E "throughput|peak memory|slide-plan|Maximum resident|Elapsed|Error|error|slideformer"
      kill $sampler; echo "disk tier peak: $(cat "$out/qwen14b-disk-peak.txt" 2>/dev/null) bytes"
      # per step (the first builds the host loop and warms up): tokens/s, host peak
      cat "$out/run-14b/csv/version_0/metrics.csv"; } > "$out/qwen14b.log" 2>&1 ;;
  order8b16)
    # the engine as it is against it with benchmarks/patches/updates-needed-first.patch (of the landed updates, the
    # one the next forward needs first runs first), alternating, 12 gradient buffers (the patch needs room to help)
    rm -rf .variant && mkdir .variant && cp -r lightning_slide .variant/ && patch -s -p1 -d .variant \
      < benchmarks/patches/updates-needed-first.patch || exit 1
    for code in now variant now variant; do
      path=$PWD; [ "$code" = variant ] && path=$PWD/.variant
      PYTHONPATH="$PWD/.site:$path" timeout 160 python3 benchmarks/bench_peers.py --timeout 150 --shapes llama3_1_8b:16 \
        --steps 5 --cap 24GiB --systems slideformer+bf16moments+bf16+buffers12 >> "$out/order8b16.log" 2>&1
      echo "^^^ $code" >> "$out/order8b16.log"
    done ;;
  before_after)
    for code in before now; do
      path=$PWD system=slideformer+park0+dev0; [ "$code" = before ] && path=$PWD/before system=slideformer+park0
      PYTHONPATH="$PWD/.site:$path" timeout 280 python3 benchmarks/bench_peers.py --timeout 250 \
        --shapes "${BEFORE_AFTER_SHAPES:-llama3_1_8b:4}" --steps 3 --cap 24GiB --systems $system \
        >> "$out/before_after.log" 2>&1
      echo "^^^ $code" >> "$out/before_after.log"
    done ;;
  *) echo "unknown stage $stage" >&2; exit 2 ;;
esac
tail -40 "$out/$stage.log"
done
