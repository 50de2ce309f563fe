"""pytest plugin: every Mamba model that transformers builds becomes a mamba-ft model.

Load it into a run of transformers' own Mamba tests (see run.py beside this file) and each
`MambaModel` / `MambaForCausalLM` the tests construct has its `MambaMixer`s and `MambaRMSNorm`s
swapped for mamba-ft's (`swap_mixers`, `swap_norms`), the way `mamba_ft.models.load_model`
hands models out:

- built from a config (`Model(config)`, `from_config`, `_from_config`): transformers builds and
  initialises the model (`post_init`), then the swap runs, still inside `post_init`;
- loaded (`from_pretrained`): the swap runs after transformers has loaded the weights, as
  `load_model` does, so transformers' own handling of missing keys runs on its own modules.

The parameters stay the same objects under the same names, so state dicts, `_init_weights`,
save/load and the tests' attribute checks see what they would see with mamba-ft.

Guards against a tier that silently tests plain transformers:
- at start-up a tiny model is built through the patch and must come out with mamba-ft modules
  only (and with the same logits as plain transformers);
- every swapped model is checked to hold no transformers mixer or norm afterwards;
- at the end of the session, if tests ran but no Mamba model went through the swap, the run
  fails.
"""

from __future__ import annotations

import contextvars
import functools
import threading

import torch
from transformers import PreTrainedModel
from transformers.models.mamba import modeling_mamba

from mamba_ft.modules.mamba_mixer import MambaFTMixer
from mamba_ft.models.swap import swap_mixers, swap_norms
from mamba_ft.modules import MambaFTRMSNorm

_HF_MIXER = modeling_mamba.MambaMixer
_HF_NORM = modeling_mamba.MambaRMSNorm
_TARGET = modeling_mamba.MambaPreTrainedModel

# How many models / modules went through the swap in this process.
STATS = {"models": 0, "mixers": 0, "norms": 0}
_stats_lock = threading.Lock()
# True while `from_pretrained` runs: the swap then waits for the weights to be loaded.
_loading = contextvars.ContextVar("mamba_ft_suite_loading", default=False)
_saved: dict | None = None


class SwapError(AssertionError):
    pass


def swap(model: torch.nn.Module) -> torch.nn.Module:
    """Swap mixers and norms of `model` in place (as `load_model` does) and check the result."""
    mixers = swap_mixers(model)
    norms = swap_norms(model)
    leftover = [name for name, m in model.named_modules() if isinstance(m, (_HF_MIXER, _HF_NORM))]
    if leftover:
        raise SwapError(f"transformers modules left after the mamba-ft swap: {leftover}")
    with _stats_lock:
        STATS["models"] += 1 if (mixers or norms) else 0
        STATS["mixers"] += mixers
        STATS["norms"] += norms
    return model


def is_mamba_ft(model: torch.nn.Module) -> bool:
    """True when `model` has Mamba layers and every one of them is mamba-ft's."""
    modules = list(model.modules())
    ours = any(isinstance(m, MambaFTMixer) for m in modules)
    theirs = any(isinstance(m, (_HF_MIXER, _HF_NORM)) for m in modules)
    return ours and not theirs


def install() -> None:
    """Patch transformers' Mamba classes so every model built or loaded is swapped."""
    global _saved
    if _saved is not None:
        return
    own_post_init = _TARGET.__dict__.get("post_init")
    own_from_pretrained = _TARGET.__dict__.get("from_pretrained")
    base_post_init = _TARGET.post_init
    base_from_pretrained = _TARGET.from_pretrained.__func__

    @functools.wraps(base_post_init)
    def post_init(self, *args, **kwargs):
        result = base_post_init(self, *args, **kwargs)
        # A MambaModel inside MambaForCausalLM is swapped by its own post_init already; the
        # outer call then finds nothing left to swap, which `swap` accepts.
        if not _loading.get():
            swap(self)
        return result

    @functools.wraps(base_from_pretrained)
    def from_pretrained(cls, *args, **kwargs):
        token = _loading.set(True)
        try:
            loaded = base_from_pretrained(cls, *args, **kwargs)
        finally:
            _loading.reset(token)
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        swap(model)
        return loaded

    _saved = {"post_init": own_post_init, "from_pretrained": own_from_pretrained}
    _TARGET.post_init = post_init
    _TARGET.from_pretrained = classmethod(from_pretrained)


def uninstall() -> None:
    """Undo `install` (transformers' classes as they were)."""
    global _saved
    if _saved is None:
        return
    for name, original in _saved.items():
        if original is None:
            delattr(_TARGET, name)
        else:
            setattr(_TARGET, name, original)
    _saved = None


def installed() -> bool:
    return _saved is not None


def self_check() -> None:
    """Build a tiny model through the patch; it must be all mamba-ft and match transformers."""
    from transformers import MambaConfig, MambaForCausalLM

    config = MambaConfig(vocab_size=64, hidden_size=16, state_size=4, num_hidden_layers=2,
                         expand=2, conv_kernel=4, time_step_rank=2)
    ours = MambaForCausalLM(config).eval()
    if not is_mamba_ft(ours):
        raise SwapError("the mamba-ft suite plugin is installed but MambaForCausalLM(config) still "
                        "has transformers' mixers or norms")
    uninstall()
    try:
        theirs = MambaForCausalLM(config).eval()
    finally:
        install()
    if is_mamba_ft(theirs) or not any(isinstance(m, _HF_MIXER) for m in theirs.modules()):
        raise SwapError("uninstalling the plugin did not give back transformers' model")
    theirs.load_state_dict(ours.state_dict())
    ids = torch.arange(12).reshape(2, 6) % config.vocab_size
    with torch.no_grad():
        a, b = ours(ids).logits, theirs(ids).logits
    if not torch.allclose(a, b, atol=1e-5, rtol=0):
        raise SwapError(f"self-check: mamba-ft logits differ from transformers' by "
                        f"{(a - b).abs().max().item():.3g}")


# ---- pytest hooks ---------------------------------------------------------------------------

def force_silu() -> None:
    """Intended difference: mamba-ft's mixer implements SiLU only (every Mamba checkpoint uses
    it) and refuses other `hidden_act`s; transformers' generic causal-LM tester configures
    'gelu'. Configs built during the run get 'silu' instead."""
    from transformers import MambaConfig

    if getattr(MambaConfig.__init__, "_mamba_ft_silu", False):
        return
    original = MambaConfig.__init__

    @functools.wraps(original)
    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        if getattr(self, "hidden_act", "silu") != "silu":
            self.hidden_act = "silu"

    __init__._mamba_ft_silu = True
    MambaConfig.__init__ = __init__


def pytest_addoption(parser):
    parser.addoption("--force-silu", action="store_true",
                     help="give every MambaConfig hidden_act='silu' (mamba-ft supports SiLU only)")
    parser.addoption("--deselect-pattern", action="append", default=[],
                     help="deselect tests whose node id contains this text (run.py's DESELECT)")


def pytest_collection_modifyitems(config, items):
    patterns = config.getoption("--deselect-pattern")
    if not patterns:
        return
    keep, drop = [], []
    for item in items:
        (drop if any(p in item.nodeid for p in patterns) else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def _baseline() -> bool:
    # run.py --baseline: the same tree against plain transformers, to tell version mismatches
    # between the test files and the library from differences of mamba-ft's.
    import os

    return os.environ.get("MAMBA_FT_SUITE_BASELINE") == "1"


def pytest_configure(config):
    if config.getoption("--force-silu"):
        force_silu()
    if _baseline():
        return
    install()
    self_check()
    # The self-check's model does not count as a model the tests built.
    STATS.update(models=0, mixers=0, norms=0)


def pytest_report_header(config):
    import transformers

    if _baseline():
        return (f"mamba-ft transformers suite: BASELINE, plain transformers "
                f"{transformers.__version__}, no swap")
    return (f"mamba-ft transformers suite: MambaMixer -> MambaFTMixer, MambaRMSNorm -> "
            f"MambaFTRMSNorm on every Mamba model (transformers {transformers.__version__})")


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    terminalreporter.write_line(
        f"mamba-ft swap: {STATS['models']} models, {STATS['mixers']} mixers, "
        f"{STATS['norms']} norms swapped"
    )


def pytest_sessionfinish(session, exitstatus):
    if session.testscollected and STATS["models"] == 0 and exitstatus == 0 and not _baseline():
        # Tests passed without one Mamba model going through mamba-ft: they tested nothing of ours.
        session.exitstatus = 1
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line("mamba-ft swap: NO Mamba model was swapped; failing the run",
                                red=True)
