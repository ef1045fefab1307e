"""QLoRA: the frozen base stored as int8 or NF4 codes. The codes stand for what an independent
quantizer written here in numpy gives (NF4: QLoRA's 16 levels, a scale per block of 64 inputs); the
real SmolLM2-135M quantized keeps its next-token distributions within a stated KL divergence of
the fp32 model's; a QLoRA
run trains (its loss falls), resumes exactly, and its merged export loads in transformers with our
logits."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from persllm_jax.model import quantization
from persllm_jax.model.lora import add_adapters, merged_model
from tests.cli_helpers import run_cli
from tests.train_runs import ONE_DEVICE, ROOT, assert_same_params, losses, train

# QLoRA's NormalFloat-4 levels (quantiles of a standard normal, scaled to [-1, 1], with an exact 0),
# as bitsandbytes and the QLoRA paper list them.
NF4_LEVELS = np.asarray([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
])  # fmt: skip


def _nf4_reference(kernel_IO: np.ndarray) -> np.ndarray:
    """Blocks of 64 inputs per output column, scaled by their absolute maximum, each value
    replaced by the nearest level."""
    d_in, d_out = kernel_IO.shape
    blocks = kernel_IO.reshape(d_in // 64, 64, d_out)
    scale = np.abs(blocks).max(axis=1, keepdims=True)
    nearest = np.abs(blocks[..., None] / scale[..., None] - NF4_LEVELS).argmin(-1)
    return (NF4_LEVELS[nearest] * scale).reshape(d_in, d_out)


def _kernel(seed=0, shape=(192, 40)):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32) * 0.05


def test_nf4_codes_stand_for_the_nearest_qlora_level():
    kernel = _kernel()
    codes, scale = quantization.quantize(jnp.asarray(kernel), "nf4")
    assert codes.dtype == jnp.uint4 and codes.shape == kernel.shape and scale.shape == (3, 40)
    ours = np.asarray(quantization.dequantize(codes, scale, "nf4", jnp.float32))
    np.testing.assert_allclose(ours, _nf4_reference(kernel), rtol=1e-6, atol=1e-7)


def test_int8_codes_are_within_half_a_step_of_the_kernel():
    """A scale per output channel: each value is within half a step (absmax / 127 at most) of
    the kernel, and the largest of each column is kept to that precision."""
    kernel = _kernel(1)
    codes, scale = quantization.quantize(jnp.asarray(kernel), "int8")
    assert codes.dtype == jnp.int8 and scale.shape == (1, 40)
    ours = np.asarray(quantization.dequantize(codes, scale, "int8", jnp.float32))
    step = np.abs(kernel).max(axis=0, keepdims=True) / 127
    assert (np.abs(ours - kernel) <= step / 2 + 1e-7).all()
    assert np.abs(ours - kernel).max() > 0  # it did quantize


def test_nf4_needs_whole_blocks():
    with pytest.raises(ValueError, match="multiple of 64"):
        quantization.quantize(jnp.zeros((96, 8)), "nf4")


# Measured on test_smollm2's chat (79 positions): the mean KL divergence of the next-token
# distributions from the fp32 model's is 0.004 nats (int8) and 0.54 (NF4), and the most likely next
# token agrees at 95% and 80% of positions. Against the fp32 model's distributions at shuffled
# positions (unrelated ones) the KL is 11.9 nats, so the bounds catch a wrong layout of the codes.
CLOSENESS = {"int8": (0.02, 0.9), "nf4": (1.0, 0.7)}  # (most KL in nats, least agreement)


def _mean_kl(p_logits, q_logits) -> float:
    log_p = np.asarray(jax.nn.log_softmax(jnp.asarray(p_logits, jnp.float32), -1), np.float64)
    log_q = np.asarray(jax.nn.log_softmax(jnp.asarray(q_logits, jnp.float32), -1), np.float64)
    return float((np.exp(log_p) * (log_p - log_q)).sum(-1).mean())


@pytest.mark.slow
@pytest.mark.parametrize("qtype", ["int8", "nf4"])
def test_a_quantized_smollm2_keeps_its_logits(smollm2_hf_dir, smollm2_tokenizer, qtype):
    from persllm_jax import load_pretrained
    from tests.test_smollm2 import _chat_ids

    model, _ = load_pretrained(smollm2_hf_dir)
    ids = jnp.asarray(_chat_ids(smollm2_tokenizer))
    reference = np.asarray(model(ids))
    quantized = add_adapters(model, rank=8, base_quantization=qtype)
    ours = np.asarray(quantized(ids))
    kl = _mean_kl(reference, ours)
    agreement = (ours.argmax(-1) == reference.argmax(-1)).mean()
    most_kl, least_agreement = CLOSENESS[qtype]
    assert 0 < kl < most_kl and agreement > least_agreement, (kl, agreement)
    # the merged model (dequantized base, adapters folded in) is the quantized model
    np.testing.assert_allclose(np.asarray(merged_model(quantized)(ids)), ours, atol=1e-4, rtol=0)


QLORA = (
    "lora.rank=4", "lora.alpha=8", "lora.base_quantization=nf4", "model.dtype=bfloat16",
    "model.compute_dtype=bfloat16", "train.max_steps=8", "checkpoint.every_steps=4",
)  # fmt: skip


@pytest.mark.slow
def test_a_qlora_run_trains_resumes_and_exports(tmp_path):
    import transformers

    from persllm_jax.io.pretrained import load_pretrained
    from tests.hf_fixtures import torch_logits

    straight, cut = tmp_path / "straight", tmp_path / "cut"
    train("sft", straight, *QLORA, env=ONE_DEVICE)
    run_losses = losses(straight)
    assert len(run_losses) == 8 and np.mean(run_losses[-2:]) < np.mean(run_losses[:2]), run_losses
    train("sft", cut, *QLORA, "train.stop_after=4", env=ONE_DEVICE)
    train("sft", cut, *QLORA, env=ONE_DEVICE)
    assert losses(cut) == run_losses  # the base is quantized again, to the same codes
    assert_same_params(straight, cut)

    # computed in fp32 to compare with PyTorch; the base is rebuilt in the bf16 it was quantized from
    model, _ = load_pretrained(straight, compute_dtype="float32")
    assert model.cfg.base_quantization == "nf4" and model.cfg.param_dtype == "bfloat16"
    assert model.layers.attn.q_proj.kernel is None
    assert model.layers.attn.q_proj.kernel_codes.get_value().dtype == jnp.uint4
    ids = np.random.default_rng(0).integers(0, 300, size=(2, 16)).astype(np.int32)
    ids[:, 1] = 49152  # a stage token, whose trained row is in the export
    run_cli("export-hf", straight, tmp_path / "merged", "--dtype", "float32", cwd=ROOT)
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "merged", output_loading_info=True
    )
    assert not any(info.values()), info
    expected = np.asarray(model(jnp.asarray(ids)))
    np.testing.assert_allclose(torch_logits(hf.eval(), ids), expected, atol=1e-4, rtol=0)


def _peak_device_bytes_while_loading(monkeypatch, load):
    """The most bytes held in live device arrays at any tensor read of `load()` (each read comes
    just before a new array is made from it) beyond those live before it, and the loaded model."""
    import gc

    from persllm_jax.io import hf_weights

    gc.collect()
    before = sum(a.nbytes for a in jax.live_arrays())
    peak, read = [0], hf_weights._read

    def counting_read(*args, **kwargs):
        peak[0] = max(peak[0], sum(a.nbytes for a in jax.live_arrays()))
        return read(*args, **kwargs)

    monkeypatch.setattr(hf_weights, "_read", counting_read)
    model = load()
    monkeypatch.setattr(hf_weights, "_read", read)
    return peak[0] - before, model


@pytest.mark.parametrize("qtype", ["int8", "nf4"])
def test_a_base_quantized_as_it_loads_has_the_codes_of_one_quantized_after(
    monkeypatch, smollm2_hf_dir, qtype
):
    """Loading SmolLM2-135M with `quantize` gives the codes that loading it whole and quantizing
    afterwards gives, bit for bit, while the device never holds more than the final model and two
    layers' fp32 kernels (the whole fp32 model is held when loading unquantized)."""
    from flax import nnx

    from persllm_jax import load_pretrained

    jax.clear_caches()
    whole_peak, whole = _peak_device_bytes_while_loading(
        monkeypatch, lambda: load_pretrained(smollm2_hf_dir)[0]
    )
    after = add_adapters(whole, rank=4, base_quantization=qtype)
    expected = {
        p: np.asarray(v.get_value())
        for p, v in nnx.to_flat_state(nnx.state(after, quantization.QuantizedBase))
    }
    del whole, after
    streamed_peak, streamed = _peak_device_bytes_while_loading(
        monkeypatch, lambda: load_pretrained(smollm2_hf_dir, quantize=qtype)[0]
    )
    got = {
        p: np.asarray(v.get_value())
        for p, v in nnx.to_flat_state(nnx.state(streamed, quantization.QuantizedBase))
    }
    assert len(expected) == 14 and set(got) == set(expected)  # codes and scales of 7 projections
    for path, value in expected.items():
        np.testing.assert_array_equal(got[path], value, err_msg=str(path))
    final = sum(x.nbytes for x in jax.tree.leaves(nnx.state(streamed)))
    cfg = streamed.cfg
    layer_kernel = 4 * cfg.hidden_size * cfg.intermediate_size  # the largest, in fp32
    assert streamed_peak <= final + 2 * layer_kernel, (streamed_peak, final, layer_kernel)
    assert whole_peak > 2 * streamed_peak, (whole_peak, streamed_peak)
    print(
        f"{qtype}: peak device bytes while loading {streamed_peak / 2**20:.0f} MiB, unquantized {whole_peak / 2**20:.0f} MiB"
    )
