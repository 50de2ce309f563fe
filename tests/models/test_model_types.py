"""The model types beyond plain Mamba and Mamba-2: FalconMamba (Mamba-1 with B/C/dt norms), the
hybrids with Mamba-1 layers (Jamba; Zamba, its SSM on heads) and those with Mamba-2 layers
(Bamba, Nemotron-H, Granite-4.0-H, Falcon-H1, Zamba2), each built tiny by plain transformers
(no downloads).

Reference: the same weights in plain transformers (its own mixers on their PyTorch path). fp32
logits within 1e-5 (the two SSD implementations sum in different orders) and identical greedy
tokens through each type's own hybrid cache; adapters on every Mamba buffer give every adapter
tensor a gradient, and merging them gives a plain transformers checkpoint of the same type with
the adapter model's logits (1e-4: merged weights against side paths, rounding only).
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from mamba_ft.adapters.families import family_of_model
from mamba_ft.adapters import (AdapterConfig, adapter_parameters, attach_adapters,
                               check_adapter_gradients, load_adapters, merge_adapters,
                               save_adapters)
from mamba_ft.adapters.config import HYBRID_LINEAR_NAMES
from mamba_ft.adapters.hybrid import layer_linears
from mamba_ft.errors import UserError
from mamba_ft.models import load_model, mixers
from mamba_ft.models.model_types import MODEL_TYPES

# Touches transformers internals (each type's mixer class and cache): rerun on the lowest versions.
pytestmark = pytest.mark.seam

VOCAB = 96
_COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
               intermediate_size=48, pad_token_id=0, bos_token_id=1, eos_token_id=2)
# Each: 8 Mamba heads of 8 channels in 2 groups, state 8, chunks of 8; Mamba layers beside
# attention (and MLP) layers.
CONFIGS = {
    "bamba": dict(num_hidden_layers=3, attn_layer_indices=[1], mamba_n_heads=8, mamba_d_head=8,
                  mamba_n_groups=2, mamba_d_state=8, mamba_d_conv=4, mamba_expand=2,
                  mamba_chunk_size=8),
    "nemotron_h": dict(layers_block_type=["mamba", "attention", "mlp", "mamba"],
                       num_hidden_layers=4, mamba_num_heads=8, mamba_head_dim=8, n_groups=2,
                       ssm_state_size=8, conv_kernel=4, expand=2, chunk_size=8),
    "granitemoehybrid": dict(num_hidden_layers=3, layer_types=["mamba", "attention", "mamba"],
                             mamba_n_heads=8, mamba_d_head=8, mamba_n_groups=2, mamba_d_state=8,
                             mamba_d_conv=4, mamba_expand=2, mamba_chunk_size=8,
                             num_local_experts=0),
    # muP multipliers off their 1.0 defaults so a missing one shows; no gated norm (the
    # default); falcon_h1_norm below has one, normed before the gate.
    "falcon_h1": dict(num_hidden_layers=2, mamba_n_heads=8, mamba_d_head=8, mamba_n_groups=2,
                      mamba_d_state=8, mamba_d_conv=4, mamba_expand=2, mamba_chunk_size=8,
                      mamba_d_ssm=64, head_dim=8, ssm_in_multiplier=0.7,
                      ssm_multipliers=[0.5, 1.5, 0.8, 1.2, 0.9], ssm_out_multiplier=1.3),
    "falcon_h1+norm": dict(num_hidden_layers=2, mamba_n_heads=8, mamba_d_head=8,
                           mamba_n_groups=2, mamba_d_state=8, mamba_d_conv=4, mamba_expand=2,
                           mamba_chunk_size=8, mamba_d_ssm=64, head_dim=8, mamba_rms_norm=True,
                           mamba_norm_before_gate=True, ssm_in_multiplier=0.7),
    "jamba": dict(num_hidden_layers=4, attn_layer_period=2, attn_layer_offset=1,
                  expert_layer_period=2, expert_layer_offset=1, num_experts=2,
                  num_experts_per_tok=1, mamba_d_state=8, mamba_d_conv=4, mamba_expand=2,
                  mamba_dt_rank=4, use_mamba_kernels=False),
    "falcon_mamba": dict(num_hidden_layers=2, state_size=8, expand=2, conv_kernel=4,
                         mixer_rms_eps=1e-6),
    # Mamba-1 on 2 heads of 32 channels; two hybrid layers sharing one attention + MLP block.
    # Weights at 5x transformers' default scale: at 0.02 the mixers move the logits by ~1e-7,
    # too little for a wrong head (x_proj, dt_proj, A, D) to show at 1e-5.
    "zamba": dict(num_hidden_layers=5,
                  layers_block_type=["mamba", "hybrid", "mamba", "hybrid", "mamba"],
                  n_mamba_heads=2, mamba_d_state=8, mamba_d_conv=4, mamba_expand=2,
                  mamba_dt_rank=4, initializer_range=0.1),
    "zamba2": dict(num_hidden_layers=4, layers_block_type=["mamba", "hybrid", "mamba", "mamba"],
                   n_mamba_heads=8, mamba_headdim=8, mamba_ngroups=2, mamba_d_state=8,
                   mamba_d_conv=4, mamba_expand=2, chunk_size=8, attention_head_dim=8,
                   num_mem_blocks=1, use_shared_attention_adapter=False, use_mem_rope=False),
}
TYPES = sorted(CONFIGS)  # "type+variant" names a second configuration of one type


def entry(name: str):
    return MODEL_TYPES[name.split("+")[0]]


HYBRIDS = sorted(t for t in CONFIGS if entry(t).hybrid)


def plain(model_type: str, seed: int = 0):
    """transformers' own model, random init, with D (and Mamba-2's gated norm and dt bias) moved
    off their start values so a wrong path through them shows."""
    torch.manual_seed(seed)
    config = AutoConfig.for_model(model_type.split("+")[0], **_COMMON, **CONFIGS[model_type])
    model = AutoModelForCausalLM.from_config(config).float().eval()
    mixer_class = entry(model_type).transformers_mixer()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, mixer_class):
                module.D.normal_()
                if hasattr(module, "dt_bias"):  # the Mamba-2 mixers
                    module.dt_bias.normal_(0.0, 0.5)
                    if hasattr(module.norm, "weight"):  # Falcon-H1's may be absent
                        module.norm.weight.normal_(1.0, 0.2)
    return model


@pytest.fixture
def ids() -> torch.Tensor:
    # 21 positions: not a multiple of the chunk (8).
    return torch.randint(3, VOCAB, (2, 21), generator=torch.Generator().manual_seed(7))


def test_every_hybrid_in_this_file_is_a_registered_type():
    assert {t for t, e in MODEL_TYPES.items() if e.hybrid} == {t.split("+")[0] for t in HYBRIDS}


@pytest.mark.parametrize("model_type", TYPES)
def test_type_loads_with_mamba_ft_mixers_and_equals_plain_transformers(model_type, tmp_path, ids):
    reference = plain(model_type)
    n_mamba = sum(isinstance(m, entry(model_type).transformers_mixer())
                  for m in reference.modules())
    reference.save_pretrained(tmp_path)
    loaded = load_model(tmp_path, need_tokenizer=False)
    model = loaded.model.eval()
    assert loaded.is_mamba and type(model) is type(reference)
    found = mixers(model)
    assert len(found) == n_mamba >= 2
    assert all(type(m) is entry(model_type).replacement for m in found)
    # Every other layer is transformers' own, and every parameter keeps its name.
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in reference.named_parameters()]
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding in the second row
    with torch.no_grad():
        for kwargs in ({}, {"attention_mask": mask}):
            ours, theirs = model(ids, **kwargs).logits, reference(ids, **kwargs).logits
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
        # Greedy decoding through the type's own hybrid cache: identical tokens.
        ours = model.generate(ids[:, :9], max_new_tokens=6, do_sample=False)
        theirs = reference.generate(ids[:, :9], max_new_tokens=6, do_sample=False)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("model_type", TYPES)
def test_adapters_train_every_mamba_buffer_and_merge_to_plain_transformers(model_type, tmp_path,
                                                                           ids):
    reference = plain(model_type, seed=1)
    reference.save_pretrained(tmp_path / "base")
    model = load_model(tmp_path / "base", need_tokenizer=False).model
    report = attach_adapters(model, AdapterConfig(targets=["all", "embeddings", "lm_head"], rank=3))
    hybrid = entry(model_type).hybrid
    # A hybrid's report counts the adapted modules of each layer kind; `all` covers them all.
    coverage = [note for note in report.notes if note.startswith("hybrid model, adapted:")]
    assert len(coverage) == hybrid
    if hybrid:
        linears = layer_linears(model, mixers(model))
        assert {k for k in linears.values()} >= {"attention"}
        n_mixers = len(mixers(model))
        assert f"Mamba mixers {n_mixers}/{n_mixers}" in coverage[0]
        for kind in ("attention", "mlp"):
            n = sum(k == kind for k in linears.values())
            assert f"{kind} Linears {n}/{n}" in coverage[0]
        lora_modules = {n.rsplit(".lora_", 1)[0] for n in adapter_parameters(model) if ".lora_" in n}
        assert set(linears) <= lora_modules
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, p in sorted(adapter_parameters(model).items()):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    model(ids, labels=ids).loss.backward()
    check_adapter_gradients(model)
    zero = [n for n, p in adapter_parameters(model).items() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not zero, zero
    in_every_mixer = {r.target for r in report.rows if r.modules == len(mixers(model))}
    expected = set(family_of_model(mixers(model)).targets.aliases["all"])
    if getattr(mixers(model)[0], "norm", True) is None:  # Falcon-H1 without its gated norm
        expected.discard("norm")
        with pytest.raises(UserError, match="'norm' matches nothing.*have no norm"):
            attach_adapters(load_model(tmp_path / "base", need_tokenizer=False).model,
                            AdapterConfig(targets=["norm"], rank=2))
    assert expected <= in_every_mixer and ("norm" in in_every_mixer) == ("norm" in expected)
    model.eval()
    with torch.no_grad():
        adapter_logits = model(ids).logits
    # Saved (PEFT format plus mamba-ft's file) and loaded onto a fresh base: the same logits.
    save_adapters(model, tmp_path / "adapter", base_model=str(tmp_path / "base"))
    fresh = load_adapters(load_model(tmp_path / "base", need_tokenizer=False).model.eval(),
                          tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, adapter_logits, rtol=0, atol=0)
    merge_adapters(model)
    model.save_pretrained(tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert not mixers(merged)  # plain transformers, its own mixers
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapter_logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("model_type", HYBRIDS)
def test_hybrid_targets_choose_layer_kinds_and_linears(model_type, ids):
    model = load_model(plain(model_type).config.to_dict(), need_tokenizer=False, seed=0).model
    linears = layer_linears(model, mixers(model))
    # Only the attention Linears: no mixer adapter, LoRA on exactly those modules.
    report = attach_adapters(model, AdapterConfig(targets=["attention"], rank=2))
    assert all(m.adapter is None for m in mixers(model))
    lora_modules = {n.rsplit(".lora_", 1)[0] for n in adapter_parameters(model) if ".lora_" in n}
    assert lora_modules == {n for n, kind in linears.items() if kind == "attention"}
    assert [r.target for r in report.rows] == ["attention"]
    model(ids, labels=ids).loss.backward()
    check_adapter_gradients(model)
    # A Mamba buffer beside a Linear's own name and the MLP kind.
    model = load_model(plain(model_type).config.to_dict(), need_tokenizer=False, seed=0).model
    leaf = sorted(n.rsplit(".", 1)[-1] for n, k in linears.items() if k == "attention")[0]
    targets = ["conv1d", leaf] + (["mlp"] if "mlp" in linears.values() else [])
    report = attach_adapters(model, AdapterConfig(targets=targets, rank=2,
                                                  rank_per_target={leaf: 4}))
    assert all(m.adapter is not None for m in mixers(model))
    assert [r.target for r in report.rows][:2] == ["conv1d", leaf]
    ranks = {n.rsplit(".lora_A", 1)[0]: p.shape[0] for n, p in adapter_parameters(model).items()
             if ".lora_A" in n}
    assert all(ranks[n] == 4 for n in linears if n.rsplit(".", 1)[-1] == leaf)


def test_hybrid_linear_names_known_to_the_config_are_the_models():
    """AdapterConfig checks a list mixing Mamba targets with Linear names against
    HYBRID_LINEAR_NAMES before any model exists; it must be what the hybrids hold."""
    names = set()
    for model_type in HYBRIDS:
        model = load_model(plain(model_type).config.to_dict(), need_tokenizer=False, seed=0).model
        names |= {n.rsplit(".", 1)[-1] for n in layer_linears(model, mixers(model))}
    assert {n for n in names if not n.isdigit()} == set(HYBRID_LINEAR_NAMES)


def test_unknown_hybrid_target_names_both_vocabularies():
    model = load_model(plain("bamba").config.to_dict(), need_tokenizer=False, seed=0).model
    with pytest.raises(UserError, match="Unknown adapter target 'q_prj'.*Did you mean 'q_proj'.*"
                                        "its other layers take attention, mlp"):
        attach_adapters(model, AdapterConfig(targets=["q_prj"], rank=2))
    assert not adapter_parameters(model)  # nothing half-attached


@pytest.mark.parametrize("model_type", [t for t in HYBRIDS if entry(t).packs])
def test_packed_row_equals_its_documents_run_apart(model_type):
    """Two documents packed in one row, through the training step's packed path (Mamba layers
    inside `document_starts`, attention given restarting position ids and no mask): per-token
    logits and the adapter gradients of the summed loss equal those of the documents run one by
    one (fp32; summation order only: 1e-4 of each gradient's largest entry, measured up to 3e-5
    for Jamba's Mamba-1 layers, whose reference scan sums in chunks)."""
    from accelerate import Accelerator

    from mamba_ft.data import IGNORE
    from mamba_ft.training.step import forward_loss_sum

    model = load_model(plain(model_type).config.to_dict(), need_tokenizer=False, seed=0).model
    attach_adapters(model, AdapterConfig(targets=["all"], rank=2))
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for _, p in sorted(adapter_parameters(model).items()):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    docs = [torch.randint(3, VOCAB, (1, n), generator=gen) for n in (11, 13)]
    accelerator = Accelerator(cpu=True)

    def grads_after(batches):
        model.zero_grad()
        total = sum(forward_loss_sum(model, b, accelerator, backward_scale=1.0) for b in batches)
        return total.item(), {n: p.grad.clone() for n, p in adapter_parameters(model).items()}

    row = torch.cat(docs, dim=1)
    starts = torch.zeros_like(row, dtype=torch.bool)
    starts[0, [0, docs[0].shape[1]]] = True
    labels = row.clone()
    labels[0, docs[0].shape[1]] = IGNORE  # a document's first token is no target of the last
    packed = {"input_ids": row, "labels": labels, "attention_mask": torch.ones_like(row),
              "document_starts": starts}
    apart = [{"input_ids": d, "labels": d.clone(), "attention_mask": torch.ones_like(d)}
             for d in docs]
    loss_packed, grads_packed = grads_after([packed])
    loss_apart, grads_apart = grads_after(apart)
    assert loss_packed == pytest.approx(loss_apart, rel=1e-5)
    for name, g in grads_apart.items():
        torch.testing.assert_close(grads_packed[name], g, rtol=1e-4,
                                   atol=1e-4 * g.abs().max().item() + 1e-9, msg=name)
    # Without the restart the second document would see the first: the test can tell.
    unpacked = dict(packed)
    del unpacked["document_starts"]
    assert grads_after([unpacked])[0] != pytest.approx(loss_apart, rel=1e-5)


def test_packing_is_refused_where_attention_would_cross_documents():
    """Granite-4.0-H's model builds its attention mask without the position ids: a packed row
    through the packed path is not its documents apart, so packing is refused for it."""
    from mamba_ft.models.model_types import check_packing

    model = load_model(plain("granitemoehybrid").config.to_dict(), need_tokenizer=False, seed=0).model
    with pytest.raises(UserError, match="packing is not supported for Granite-4.0-H"):
        check_packing(model)
    for model_type in HYBRIDS:
        if entry(model_type).packs:
            check_packing(plain(model_type))  # no error


@pytest.mark.parametrize("model_type", ["nemotron_h", "zamba"])
def test_qlora_on_a_hybrid_quantises_its_mamba_projections_only(model_type, ids):
    """model.quantize on a hybrid (Mamba-2 layers; Zamba's Mamba-1 heads): the Mamba layers'
    in_proj / out_proj hold nf4 weights, the attention and MLP (and Zamba's raw per-head x_proj /
    dt_proj) stay as they were; with adapters everywhere the logits and gradients equal the
    same model with the dequantised weights in plain Linears."""
    import copy

    pytest.importorskip("bitsandbytes")
    from mamba_ft.models.quantize import QuantizeConfig, dequantize_model, quantize_model
    from mamba_ft.modules.quantized import is_quantized

    model = load_model(plain(model_type).config.to_dict(), need_tokenizer=False, seed=0).model
    try:
        report = quantize_model(model, QuantizeConfig(kind="nf4"))
    except UserError as exc:  # a bitsandbytes build without a backend for this CPU
        pytest.skip(str(exc))
    quantized = {n for n, m in model.named_modules() if is_quantized(m)}
    assert quantized == {f"{n}.{p}" for n, m in model.named_modules() if m in mixers(model)
                         for p in ("in_proj", "out_proj")}
    assert report.rows["in_proj"][0] == len(mixers(model))
    attach_adapters(model, AdapterConfig(targets=["all"], rank=2))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, p in sorted(adapter_parameters(model).items()):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    twin = copy.deepcopy(model)
    dequantize_model(twin)
    model(ids, labels=ids).loss.backward()
    twin(ids, labels=ids).loss.backward()
    ours = adapter_parameters(model)
    for name, p in adapter_parameters(twin).items():
        torch.testing.assert_close(ours[name].grad, p.grad, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("model_type", HYBRIDS)
def test_precision_policy_keeps_recurrence_norms_and_adapters_fp32_in_a_hybrid(model_type):
    """bf16 autocast with the frozen base stored in bf16: every Mamba recurrence parameter, every
    norm weight (the hybrids' own RMSNorms included) and every adapter stays fp32, the rest of
    the frozen base goes to bf16."""
    from mamba_ft.precision import PrecisionPolicy

    model = load_model(plain(model_type).config.to_dict(), need_tokenizer=False, seed=0).model
    attach_adapters(model, AdapterConfig(targets=["all"], rank=2))
    PrecisionPolicy(mode="bf16", frozen_base="bf16").apply(model)
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    adapters = set(adapter_parameters(model))
    recurrence = {n for n in dtypes
                  if n.endswith((".A_log", ".D", ".dt_bias", "dt_proj.bias", ".dt_proj_bias"))}
    norms = {n for n, m in model.named_modules() if "Norm" in type(m).__name__
             for n in (f"{n}.weight",) if n in dtypes}
    assert recurrence and norms
    for name in adapters | recurrence | norms:
        assert dtypes[name] == torch.float32, name
    others = [n for n in dtypes if n not in adapters | recurrence | norms]
    assert others and all(dtypes[n] == torch.bfloat16 for n in others), [
        n for n in others if dtypes[n] != torch.bfloat16]


def test_info_describes_a_hybrid_and_its_targets(tmp_path, capsys):
    """`mamba-ft info` on a hybrid: its type, how many layers are Mamba, the Mamba targets, and
    the attention / MLP Linears LoRA can reach, counted as the attach report counts them."""
    from mamba_ft.cli import main

    plain("nemotron_h").save_pretrained(tmp_path)
    main(["info", str(tmp_path / "config.json")])
    out = capsys.readouterr().out
    assert "Nemotron-H (mamba-ft Mamba-2 mixers: 2 of 4 layers)" in out
    assert "in_proj.z" in out and "attention = 4 Linears (k_proj, o_proj, q_proj, v_proj)" in out
    assert "mlp = 2 Linears (down_proj, up_proj)" in out


@pytest.mark.parametrize("model_type", ["jamba", "zamba"])
def test_info_describes_a_mamba1_hybrid(model_type, tmp_path, capsys):
    """`mamba-ft info` on a hybrid with Mamba-1 layers: the geometry read from its mixers (the
    configs name it otherwise), Zamba's SSM heads, and the attention / MLP Linears (Zamba's one
    shared block counted once)."""
    from mamba_ft.cli import main

    reference = plain(model_type)
    reference.save_pretrained(tmp_path)
    main(["info", str(tmp_path / "config.json")])
    out = capsys.readouterr().out
    found = [m for m in reference.modules() if isinstance(m, entry(model_type).transformers_mixer())]
    mixer, n_mamba = found[0], len(found)
    heads = (f", {mixer.n_mamba_heads} SSM heads x {mixer.mamba_head_dim}"
             if model_type == "zamba" else "")
    assert (f"{entry(model_type).name} (mamba-ft Mamba-1 mixers: {n_mamba} of "
            f"{reference.config.num_hidden_layers} layers)") in out
    assert (f"d_inner {mixer.intermediate_size}{heads}, state {mixer.ssm_state_size}, conv "
            f"{mixer.conv_kernel_size}, dt rank {mixer.time_step_rank}") in out
    loaded = load_model(tmp_path, need_tokenizer=False).model
    linears = layer_linears(loaded, mixers(loaded))
    n_attention = sum(kind == "attention" for kind in linears.values())
    assert n_attention == (4 if model_type == "zamba" else 4 * 2)  # Jamba: 2 attention layers
    assert "x_proj.dt" in out
    assert f"attention = {n_attention} Linears (k_proj, o_proj, q_proj, v_proj)" in out


def _zamba_hybrid_layers(model):
    return [layer for layer in model.model.layers if hasattr(layer, "shared_transf")]


def test_zamba_shared_block_is_one_module_with_one_adapter(tmp_path, ids):
    """transformers' Zamba builds its shared attention + MLP once per hybrid layer and ties the
    copies' weights; mamba-ft makes them one module, so `attention` / `mlp` put one LoRA there,
    which every use trains, and the merge adds it once. With the word embeddings still tied the
    merged checkpoint keeps the block tied (stored once) and plain transformers gives the
    adapter model's logits."""
    reference = plain("zamba", seed=2)
    reference.save_pretrained(tmp_path / "base")
    ref_layers = _zamba_hybrid_layers(reference)
    assert len(ref_layers) == 2 and ref_layers[0].shared_transf is not ref_layers[1].shared_transf
    model = load_model(tmp_path / "base", need_tokenizer=False).model
    first, second = _zamba_hybrid_layers(model)
    assert first.shared_transf is second.shared_transf
    assert model.state_dict().keys() == reference.state_dict().keys()
    report = attach_adapters(model, AdapterConfig(targets=["attention", "mlp", "x_proj.B",
                                                           "dt_proj"], rank=2))
    assert "attention Linears 4/4, mlp Linears 3/3" in report.format()
    lora = {n.rsplit(".lora_", 1)[0] for n in adapter_parameters(model)
            if ".lora_" in n and ".adapter." not in n}  # PEFT's, not the mixers'
    assert lora == set(layer_linears(model, mixers(model)))
    assert all(".layers.1.shared_transf." in n for n in lora)
    # Per-head deltas on Zamba's stacked raw parameters: (heads, out, rank) / (heads, rank, in).
    mixer = mixers(model)[0]
    heads, head_dim = mixer.n_heads, mixer.head_dim
    assert mixer.adapter.low_rank["x_proj_B"].lora_A.shape == (heads, 2, head_dim)
    assert mixer.adapter.low_rank["dt_proj"].lora_B.shape == (heads, head_dim, 2)
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for _, p in sorted(adapter_parameters(model).items()):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    # Both uses train the one LoRA: cutting either off (detaching the block's output where that
    # hybrid layer's own `linear` reads it) leaves a gradient that is not the whole one.
    q_proj = first.shared_transf.self_attn.q_proj
    grads = []
    for use in (None, first, second):
        model.zero_grad()
        hook = None if use is None else use.linear.register_forward_pre_hook(
            lambda m, args: (args[0].detach(),))
        try:
            model(ids, labels=ids).loss.backward()
        finally:
            if hook is not None:
                hook.remove()
        grads.append(q_proj.lora_B["default"].weight.grad.clone())
    both, without_first, without_second = grads
    for part in (without_first, without_second):
        assert part.abs().sum() > 0 and (both - part).abs().max() > 1e-3 * both.abs().max()
    model.eval()
    with torch.no_grad():
        adapter_logits = model(ids).logits
    merge_adapters(model)
    assert first.shared_transf is second.shared_transf and model.config.tie_word_embeddings
    model.save_pretrained(tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapter_logits, rtol=1e-4, atol=1e-4)
    a, b = _zamba_hybrid_layers(merged)
    assert a.shared_transf.self_attn.q_proj.weight is b.shared_transf.self_attn.q_proj.weight


def test_zamba_merge_that_unties_the_embeddings_stores_every_copy_of_the_shared_block(tmp_path,
                                                                                       ids):
    """transformers ties Zamba's shared block only under tie_word_embeddings: merging an
    embeddings adapter unties the embeddings, so each hybrid layer gets its own copy of the
    (merged) block, and mamba-ft and plain transformers both load the checkpoint back to the
    adapter model's logits."""
    plain("zamba", seed=3).save_pretrained(tmp_path / "base")
    model = load_model(tmp_path / "base", need_tokenizer=False).model
    attach_adapters(model, AdapterConfig(targets=["embeddings", "attention"], rank=2))
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for _, p in sorted(adapter_parameters(model).items()):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    model.eval()
    with torch.no_grad():
        adapter_logits = model(ids).logits
    merge_adapters(model)
    first, second = _zamba_hybrid_layers(model)
    assert not model.config.tie_word_embeddings and first.shared_transf is not second.shared_transf
    torch.testing.assert_close(first.shared_transf.self_attn.q_proj.weight,
                               second.shared_transf.self_attn.q_proj.weight, rtol=0, atol=0)
    model.save_pretrained(tmp_path / "merged")
    for reloaded in (AutoModelForCausalLM.from_pretrained(tmp_path / "merged"),
                     load_model(tmp_path / "merged", need_tokenizer=False).model):
        with torch.no_grad():
            torch.testing.assert_close(reloaded.eval()(ids).logits, adapter_logits, rtol=1e-4,
                                       atol=1e-4)


def test_zamba_adapter_peft_file_loads_in_plain_peft(tmp_path, ids):
    """Zamba's in_proj and out_proj are called as modules by transformers and PEFT does not
    refuse out_proj for it: those (and embeddings / lm_head) go to the PEFT file, which
    `PeftModel.from_pretrained` applies on plain transformers' Zamba as mamba-ft does; the rest
    (per-head x_proj / dt_proj, conv1d, the SSM deltas) to mamba-ft's file."""
    import json

    from peft import PeftModel

    plain("zamba", seed=4).save_pretrained(tmp_path / "base")
    model = load_model(tmp_path / "base", need_tokenizer=False).model
    attach_adapters(model, AdapterConfig(targets=["in_proj", "out_proj", "embeddings", "lm_head",
                                                  "x_proj", "A_log"], rank=2))
    gen = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for name, p in sorted(adapter_parameters(model).items()):
            # x_proj and A_log stay at zero: plain PEFT cannot apply them.
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1 * ("x_proj" not in name and
                                                                 "A_log" not in name))
    save_adapters(model, tmp_path / "adapter", base_model=str(tmp_path / "base"))
    meta = json.loads((tmp_path / "adapter" / "mamba_ft_adapter.json").read_text())
    assert meta["peft_targets"] == ["embeddings", "in_proj", "lm_head", "out_proj"]
    assert meta["mamba_ft_only_targets"] == ["A_log", "x_proj"]
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    peft_model = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(ids).logits, model.eval()(ids).logits,
                                   rtol=1e-5, atol=1e-5)
