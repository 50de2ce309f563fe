"""One loader for every way a user names a model.

`load_model(source)` accepts
- a Hugging Face format directory (config.json + safetensors): Mamba, Mamba-2, a hybrid with
  Mamba-2 layers (`model_types.MODEL_TYPES`), or any causal LM;
- an original mamba_ssm format directory (config.json with d_model / n_layer / ssm_cfg,
  weights in pytorch_model.bin), converted on load into transformers' MambaForCausalLM, or
  Mamba2ForCausalLM when `ssm_cfg.layer` is Mamba2;
- a config alone: a .json / .yaml file, a dict or a `PretrainedConfig` (random init);
- `bundled:NAME` for the tiny models shipped inside the package;
- a hub id, when a network exists.
Every model of a type in `model_types.MODEL_TYPES` comes back with its Mamba mixers swapped for
mamba-ft's (`swap_mixers`), and a pure Mamba with its RMSNorms too (`swap_norms`).
Nothing here runs code from the user's files: safetensors, `torch.load(weights_only=True)`,
`yaml.safe_load`, and `trust_remote_code` only when the caller passes it.
"""

from __future__ import annotations

import json
import math
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import SafetensorError, safe_open
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
)

from mamba_ft.errors import UserError
from mamba_ft.models.model_types import mamba_model_type, supported_names
from mamba_ft.models.mamba_ssm_format import (is_mamba_ssm_config, load_mamba_ssm_dir,
                                             unsafe_pickle_message)
from mamba_ft.models.quantize import (QuantizationReport, QuantizeConfig, adopt_prequantized,
                                      check_prequantized, quantize_model)
from mamba_ft.models.swap import swap_mixers, swap_norms

BUNDLED_DIR = Path(__file__).resolve().parent.parent / "bundled"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: Any  # a transformers tokenizer, or None when not asked for
    is_mamba: bool
    source: str
    quantization: QuantizationReport | None = None  # what model.quantize did (models/quantize.py)


def resolve_source(source: str | Path) -> Path | str:
    """A local path for `source`, or the string itself when it can only be a hub id."""
    text = str(source)
    if text.startswith("bundled:"):
        name = text.split(":", 1)[1]
        path = BUNDLED_DIR / name
        if not path.is_dir():
            names = sorted(p.name for p in BUNDLED_DIR.iterdir() if p.is_dir()) if BUNDLED_DIR.is_dir() else []
            raise UserError(f"There is no bundled model {name!r}; the bundled models are: "
                            f"{', '.join(names) or 'none'}.")
        return path
    path = Path(text).expanduser()
    if path.exists():
        return path
    looks_like_file = path.suffix in (".json", ".yaml", ".yml", ".bin", ".safetensors")
    if _HUB_ID.match(text) and not text.startswith((".", "/", "~")) and not looks_like_file:
        return text
    raise UserError(f"Model path {text!r} does not exist; give a checkpoint directory, a config "
                    f"file (.json/.yaml), a hub id such as 'state-spaces/mamba-130m-hf', or "
                    f"'bundled:tiny-mamba'.")


# transformers writes floats JSON cannot hold as {"__float__": "Infinity"} (Mamba2Config's
# default time_step_limit is (0, inf)) and decodes them in from_pretrained; a config read here
# goes to AutoConfig.for_model, which takes the values as they are, so decode them first.
_SPECIAL_FLOATS = {"Infinity": math.inf, "-Infinity": -math.inf, "NaN": math.nan}


def _decode_special_floats(value):
    if isinstance(value, dict):
        if set(value) == {"__float__"} and value["__float__"] in _SPECIAL_FLOATS:
            return _SPECIAL_FLOATS[value["__float__"]]
        return {k: _decode_special_floats(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode_special_floats(v) for v in value]
    return value


def config_from_file(path: Path) -> dict:
    try:
        text = path.read_text()
        data = yaml.safe_load(text) if path.suffix in (".yaml", ".yml") else json.loads(text)
        data = _decode_special_floats(data)
    except (OSError, ValueError, yaml.YAMLError) as exc:
        raise UserError(f"Could not read the model config {path}: {exc}. Fix the file so it is "
                        f"valid {'YAML' if path.suffix in ('.yaml', '.yml') else 'JSON'}.") from None
    if not isinstance(data, dict):
        raise UserError(f"The model config {path} must be a mapping of config keys to values.")
    return data


def config_from_dict(data: dict, where: str, allow_transformers: bool) -> PretrainedConfig:
    """A transformers config from a plain mapping, after checking the model family."""
    data = dict(data)
    model_type = data.pop("model_type", None)
    if model_type is None:
        raise UserError(f"The model config {where} has no 'model_type'; add `model_type: mamba` "
                        f"(or gpt_neox, llama, ... for a Transformer baseline).")
    check_family(model_type, where, allow_transformers)
    try:
        return AutoConfig.for_model(model_type, **data)
    except Exception as exc:  # transformers' config validators raise several unrelated types
        raise UserError(f"The model config {where} is not a valid {model_type!r} config: "
                        f"{_first_line(exc)}.") from None


def check_family(model_type: str | None, where: str, allow_transformers: bool) -> bool:
    """True for a model type with Mamba mixers that mamba-ft serves; a clear error for what
    mamba-ft cannot load as asked."""
    if mamba_model_type(model_type) is not None:
        return True
    if not allow_transformers:
        raise UserError(f"{where} is a {model_type!r} model, not one with Mamba layers "
                        f"({supported_names()}); point to such a checkpoint, or load it as a "
                        f"Transformer baseline.")
    return False


def _causal_lm_class(model_type: str):
    """The transformers class that builds this model type: the Mamba entry's, else Auto's."""
    entry = mamba_model_type(model_type)
    if entry is None or entry.causal_lm_class is None:
        return AutoModelForCausalLM
    return entry.load_class(entry.causal_lm_class)


def load_tokenizer(path: Path | str, where: str, trust_remote_code: bool = False):
    """The tokenizer stored in `path`; never a silent hub lookup for a local directory."""
    local = Path(str(path))
    if local.is_dir() and not any((local / f).exists() for f in _TOKENIZER_FILES):
        raise UserError(f"{where} has no tokenizer (none of {', '.join(_TOKENIZER_FILES)}); copy "
                        f"the tokenizer files into it, or name a tokenizer directory "
                        f"(recipe key model.tokenizer).")
    try:
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code,
                                             local_files_only=local.exists())
    except (OSError, ValueError) as exc:
        raise UserError(f"Could not load the tokenizer from {path}: {exc}") from None


def check_weight_shapes(path: Path, config: PretrainedConfig, cls) -> None:
    """Compare the safetensors headers in `path` with the shapes `config` implies.

    Reads headers only (no tensor data) and builds the model on the meta device, so a wrong
    checkpoint is reported by name before any weight is loaded.
    """
    files = sorted(path.glob("*.safetensors"))
    if not files:
        return
    with torch.device("meta"):
        expected = {k: v.shape for k, v in (cls(config) if cls is not AutoModelForCausalLM
                                             else AutoModelForCausalLM.from_config(config)).state_dict().items()}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():
                    want = expected.get(key.replace("backbone.embedding.", "backbone.embeddings."))
                    got = tuple(handle.get_slice(key).get_shape())
                    if want is not None and tuple(want) != got:
                        raise UserError(f"The weights in {path} do not fit its config.json ({key} has shape "
                                        f"{got}, the config implies {tuple(want)}); the config and the "
                                        f"weights come from different models.")
        except SafetensorError as exc:
            raise UserError(f"Could not read {file}: {exc}. The file is damaged; download or save it again.") from None


def _from_pretrained(cls, path, where: str, dtype, trust_remote_code: bool, config=None):
    if config is not None and isinstance(path, Path):
        check_weight_shapes(path, config, cls)
    try:
        return cls.from_pretrained(str(path), dtype=dtype, trust_remote_code=trust_remote_code,
                                   local_files_only=Path(str(path)).exists())
    except pickle.UnpicklingError:
        raise UserError(unsafe_pickle_message(where)) from None
    except OSError as exc:
        raise UserError(f"Could not load {where}: {exc}".rstrip(".") + ". Check the path, or "
                        "download the checkpoint where a network exists and pass its directory.") from None
    except (RuntimeError, ValueError) as exc:
        if "mismatch" in str(exc) or "shape" in str(exc):
            raise UserError(f"The weights in {where} do not fit its config.json ({_first_line(exc)}); "
                            f"the config and the weights come from different models.") from None
        raise


def _first_line(exc: Exception) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    mismatch = [line for line in lines if "size mismatch" in line or "shape" in line]
    return (mismatch or lines or [type(exc).__name__])[0]


def load_model(
    source: str | Path | dict | PretrainedConfig,
    *,
    tokenizer: str | Path | None = None,
    need_tokenizer: bool = True,
    allow_transformers: bool = False,
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
    seed: int | None = None,
    quantize: QuantizeConfig | None = None,
) -> LoadedModel:
    """Load a model (and its tokenizer) from any source described in the module docstring.

    `tokenizer` overrides where the tokenizer comes from (required for a config alone when
    `need_tokenizer`). Models with Mamba layers always come back with mamba-ft's mixers. `quantize`
    (bitsandbytes, models/quantize.py) quantises the base after loading; a checkpoint saved
    quantised must agree with it, and is read by transformers' own bitsandbytes loader.
    """
    where = str(source) if not isinstance(source, (dict, PretrainedConfig)) else "the given config"
    tokenizer_from = tokenizer
    prequantized = None  # the recipe's QuantizeConfig, once a saved quantization_config agrees

    if isinstance(source, (dict, PretrainedConfig)):
        if isinstance(source, dict):
            config = config_from_dict(source, where, allow_transformers)
        else:
            config = source
            check_family(config.model_type, where, allow_transformers)
        model, is_mamba = _random_init(config, dtype, seed)
    else:
        path = resolve_source(source)
        if isinstance(path, Path) and path.is_file():
            config = config_from_dict(config_from_file(path), where, allow_transformers)
            model, is_mamba = _random_init(config, dtype, seed)
        elif isinstance(path, Path):
            config_path = path / "config.json"
            if not config_path.exists():
                raise UserError(f"{path} has no config.json; point to a checkpoint directory "
                                f"(Hugging Face or mamba_ssm format).")
            raw = config_from_file(config_path)
            if "model_type" not in raw and is_mamba_ssm_config(raw):
                model, is_mamba = load_mamba_ssm_dir(path, raw, dtype), True
            else:
                if raw.get("quantization_config") is not None:
                    prequantized = check_prequantized(raw["quantization_config"], quantize, where)
                config = config_from_dict(raw, str(config_path), allow_transformers)
                is_mamba = mamba_model_type(config.model_type) is not None
                cls = _causal_lm_class(config.model_type)
                # A quantised checkpoint's weights are packed (a 4-bit matrix is stored as a
                # column of bytes): transformers' bitsandbytes loader checks those shapes.
                model = _from_pretrained(cls, path, where, dtype, trust_remote_code,
                                         None if prequantized else config)
            tokenizer_from = tokenizer_from or path
        else:  # hub id
            try:
                config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
            except OSError as exc:
                raise UserError(f"{path!r} is not a local path and the Hugging Face Hub could not "
                                f"provide it ({_first_line(exc)}); download it where a network "
                                f"exists and pass the directory.") from None
            is_mamba = check_family(config.model_type, where, allow_transformers)
            if getattr(config, "quantization_config", None) is not None:
                qc = config.quantization_config
                prequantized = check_prequantized(qc if isinstance(qc, dict) else qc.to_dict(), quantize, where)
            cls = _causal_lm_class(config.model_type)
            model = _from_pretrained(cls, path, where, dtype, trust_remote_code)
            tokenizer_from = tokenizer_from or path

    tok = None
    if need_tokenizer:
        if tokenizer_from is None:
            raise UserError(f"{where} is a config without a tokenizer; name a tokenizer directory "
                            f"(recipe key model.tokenizer, e.g. 'bundled:tiny-mamba').")
        if isinstance(tokenizer_from, str) and tokenizer_from.startswith("bundled:"):
            tokenizer_from = resolve_source(tokenizer_from)
        tok = load_tokenizer(tokenizer_from, str(tokenizer_from), trust_remote_code)
    if is_mamba:
        swap_mixers(model)
        swap_norms(model)
    if prequantized is not None:
        report = adopt_prequantized(model, prequantized, where)
    else:
        report = quantize_model(model, quantize, where) if quantize is not None else None
    return LoadedModel(model=model, tokenizer=tok, is_mamba=is_mamba, source=where, quantization=report)


def _random_init(config: PretrainedConfig, dtype, seed):
    is_mamba = mamba_model_type(config.model_type) is not None
    if seed is not None:
        torch.manual_seed(seed)
    cls = _causal_lm_class(config.model_type)
    model = cls(config) if cls is not AutoModelForCausalLM else cls.from_config(config)
    return model.to(dtype), is_mamba
