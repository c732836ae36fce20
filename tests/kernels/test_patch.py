import copy

import pytest
import torch
import transformers
from torch import nn

from lightning_slide.kernels import KERNEL_NAMES, apply_kernels

BACKWARD_OF = {  # autograd node each kernel leaves in the graph: proof that it ran, not the stock code
    "rmsnorm": "_RMSNormBackward",
    "rope": "_RoPEBackward",
    "swiglu": "_GLUBackward",
    "fused_linear_cross_entropy": "_FusedLinearCEBackward",
}
COMMON = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=300,
    head_dim=16,
)
FAMILIES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, {}),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, {}),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, {}),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, {}),
    "gemma": (transformers.GemmaConfig, transformers.GemmaForCausalLM, {}),
    "gemma2": (transformers.Gemma2Config, transformers.Gemma2ForCausalLM, {"final_logit_softcapping": 5.0}),
    "gemma3": (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM, {"final_logit_softcapping": 5.0}),
}


class Holder(nn.Module):
    """Stands in for a LightningModule that keeps the HF model as an attribute."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm


def tiny(family="llama", dtype=torch.float32):
    config_cls, model_cls, extra = FAMILIES[family]
    config = config_cls(**COMMON, **extra)
    config._attn_implementation = "eager"
    model = model_cls(config).to(dtype)
    with torch.no_grad():  # norms start at 1 (or 0 for Gemma): randomise them so that a wrong offset shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0.0, 0.3)
    return model


def batch(vocab=300):
    ids = torch.randint(0, vocab, (2, 11))
    labels = ids.clone()
    labels[0, :4] = -100  # a masked prompt
    return ids, labels


def backward_nodes(t):
    names, seen, stack = set(), set(), [t.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(node.name())
        stack.extend(fn for fn, _ in node.next_functions)
    return names


def loss_and_grads(model, ids, labels, **kw):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=labels, **kw)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_all_kernels_match_stock_model(family, assert_close):
    stock = tiny(family)
    holder = Holder(copy.deepcopy(stock))
    ids, labels = batch()

    assert apply_kernels(holder, "all") == list(KERNEL_NAMES)

    ref, ref_grads = loss_and_grads(stock, ids, labels)
    out, grads = loss_and_grads(holder.lm, ids, labels)
    assert set(BACKWARD_OF.values()) <= backward_nodes(out.loss)
    assert out.logits is None  # the fused loss never builds them
    assert_close(out.loss, ref.loss, torch.float32)
    assert grads.keys() == ref_grads.keys()
    for name in ref_grads:
        assert_close(grads[name], ref_grads[name], torch.float32)


def test_bf16_model_is_about_as_accurate_as_stock():
    # bf16 roundings differ between the two paths, so both are compared with the same model in fp32 (the bf16
    # weights, upcast exactly). Triton's CPU interpreter truncates fp32 -> bf16 stores (the GPU rounds to nearest),
    # which alone doubles the kernels' rounding error here, hence the factor 3.
    stock = tiny("llama", torch.bfloat16)
    patched, exact = copy.deepcopy(stock), copy.deepcopy(stock).float()
    apply_kernels(patched)
    ids, labels = batch()
    truth, true_grads = loss_and_grads(exact, ids, labels)
    ref, ref_grads = loss_and_grads(stock, ids, labels)
    out, grads = loss_and_grads(patched, ids, labels)

    def err(a, b):
        return ((a.float() - b).norm() / b.norm()).item()

    assert err(out.loss, truth.loss) <= max(3 * err(ref.loss, truth.loss), 1e-3)
    for name, g in true_grads.items():
        assert err(grads[name], g) <= 3 * err(ref_grads[name], g), name


def test_under_autocast_the_kernels_are_about_as_accurate_as_stock():
    """Plain Lightning's ``bf16-mixed``: fp32 parameters under autocast. Every kernel still runs (RoPE on bf16 q, k
    with fp32 cos, sin; the loss's GEMMs in bf16, as the stock head's) and lands as near the fp32 model as stock."""
    stock = tiny("llama")
    patched, exact = copy.deepcopy(stock), copy.deepcopy(stock)
    apply_kernels(patched)
    ids, labels = batch()
    truth, true_grads = loss_and_grads(exact, ids, labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref, ref_grads = loss_and_grads(stock, ids, labels)
        out, grads = loss_and_grads(patched, ids, labels)
    assert set(BACKWARD_OF.values()) <= backward_nodes(out.loss)

    def err(a, b):
        return ((a.float() - b).norm() / b.norm()).item()

    assert err(out.loss, truth.loss) <= max(3 * err(ref.loss, truth.loss), 1e-3)
    for name, g in true_grads.items():
        assert grads[name].dtype == torch.float32
        assert err(grads[name], g) <= 3 * err(ref_grads[name], g), name

    head_only = copy.deepcopy(stock)  # the fused loss alone: bf16 GEMMs give the stock head's bf16 logits' loss
    apply_kernels(head_only, ["fused_linear_cross_entropy"])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused, _ = loss_and_grads(head_only, ids, labels)
    torch.testing.assert_close(fused.loss, ref.loss, rtol=1e-6, atol=0)  # fp32 GEMMs: ~1e-5 off


def test_subset_applies_only_those():
    model = tiny("qwen3")
    assert apply_kernels(model, ["rmsnorm", "swiglu"]) == ["rmsnorm", "swiglu"]
    ids, labels = batch()
    out = model(input_ids=ids, labels=labels)
    nodes = backward_nodes(out.loss)
    assert {"_RMSNormBackward", "_GLUBackward"} <= nodes
    assert not {"_RoPEBackward", "_FusedLinearCEBackward"} & nodes
    assert out.logits is not None


def test_none_changes_nothing():
    model = tiny()
    assert apply_kernels(model, "none") == []
    assert not any("forward" in m.__dict__ for m in model.modules())


def test_applying_twice_is_harmless():
    once, twice = tiny("gemma2"), None
    twice = copy.deepcopy(once)
    apply_kernels(once)
    assert apply_kernels(twice) == apply_kernels(twice) == list(KERNEL_NAMES)
    attn = twice.model.layers[0].self_attn
    assert getattr(attn._lightning_slide_forward, "__func__", None) is type(attn).forward  # not wrapped twice
    rope = transformers.models.gemma2.modeling_gemma2.apply_rotary_pos_emb
    assert not getattr(rope.__wrapped__, "_lightning_slide", False)  # one dispatcher, not a chain
    ids, labels = batch()
    assert torch.equal(once(input_ids=ids, labels=labels).loss, twice(input_ids=ids, labels=labels).loss)


def test_state_dict_unchanged():
    model = tiny("gemma3")
    before = model.state_dict()
    apply_kernels(model)
    after = model.state_dict()
    assert list(before) == list(after)
    assert all(before[k] is after[k] or torch.equal(before[k], after[k]) for k in before)


def test_unpatched_model_of_same_family_keeps_stock_code():
    patched, plain = tiny("mistral"), tiny("mistral")
    apply_kernels(patched)
    ids, labels = batch()
    assert "_RoPEBackward" in backward_nodes(patched(input_ids=ids, labels=labels).loss)
    assert not set(BACKWARD_OF.values()) & backward_nodes(plain(input_ids=ids, labels=labels).loss)


def test_without_labels_returns_stock_logits(assert_close):
    stock = tiny("gemma2")
    patched = copy.deepcopy(stock)
    apply_kernels(patched)
    ids, _ = batch()
    assert_close(patched(input_ids=ids).logits, stock(input_ids=ids).logits, torch.float32)
    assert patched(input_ids=ids, logits_to_keep=1).logits.shape == (2, 1, 300)


def test_loss_options_follow_transformers(assert_close):
    stock = tiny("llama")
    patched = copy.deepcopy(stock)
    apply_kernels(patched, ["fused_linear_cross_entropy"])
    ids, labels = batch()
    n = torch.tensor(13)
    assert_close(
        patched(input_ids=ids, labels=labels, num_items_in_batch=n).loss,
        stock(input_ids=ids, labels=labels, num_items_in_batch=n).loss,
        torch.float32,
    )
    shift = torch.randint(0, 300, (2, 11))
    assert_close(
        patched(input_ids=ids, labels=labels, shift_labels=shift).loss,
        stock(input_ids=ids, labels=labels, shift_labels=shift).loss,
        torch.float32,
    )
    as_tuple = patched(input_ids=ids, labels=labels, return_dict=False)
    assert isinstance(as_tuple, tuple)
    assert_close(as_tuple[0], stock(input_ids=ids, labels=labels).loss, torch.float32)
    everything_ignored = torch.full_like(labels, -100)
    assert patched(input_ids=ids, labels=everything_ignored).loss.item() == 0.0


def test_unknown_kernel_name_raises():
    with pytest.raises(ValueError, match="valid.*rmsnorm.*fused_linear_cross_entropy"):
        apply_kernels(tiny(), ["rmsnorm", "flash_attention"])


def test_unknown_model_is_left_untouched_with_a_warning():
    with pytest.warns(UserWarning, match="no Hugging Face model"):
        assert apply_kernels(nn.Sequential(nn.Linear(4, 4))) == []
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=50))
    with pytest.warns(UserWarning, match="GPT2LMHeadModel"):
        assert apply_kernels(Holder(gpt2)) == []
    assert not any("forward" in m.__dict__ for m in gpt2.modules())


def test_active_kernels_reports_what_is_swapped_in():
    from transformers import AutoModelForCausalLM, LlamaConfig

    from lightning_slide.kernels import active_kernels, apply_kernels

    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = AutoModelForCausalLM.from_config(config)
    assert active_kernels(model) == []
    apply_kernels(model, ["swiglu", "rmsnorm"])
    assert active_kernels(model) == ["rmsnorm", "swiglu"]
