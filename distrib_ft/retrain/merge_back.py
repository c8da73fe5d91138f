"""Merge-back for the retraining gate: WiSE-FT-style interpolation theta0 + alpha (theta - theta0), and choosing alpha.

Wortsman et al. 2022, "Robust fine-tuning of zero-shot models" (arXiv:2109.01903): a fine-tuned model's weights
interpolated with the weights it started from keep much of the start's robustness for a small loss on the new task.
The gate of ``distrib-ft retrain`` (issue 12, option ``merge_back``) uses it when a candidate breaks the
retention budget: :func:`interpolate` writes the model at one alpha, :func:`choose` tries a grid largest first and
keeps the first alpha the measurements pass.

``kind="full"`` (full / partial / bitfit: final/ is a Hugging Face model folder): every floating tensor is
``torch.lerp(theta0, theta, alpha)`` in fp32 (https://pytorch.org/docs/stable/generated/torch.lerp.html; its CPU and
CUDA kernels compute ``end - (end - start) * (1 - w)`` for w >= 0.5, so alpha = 1 gives the candidate and alpha = 0
the start bit for bit), stored in the dtype that tensor has in the candidate's safetensors files (a bf16 run's
final/ holds fp32 master weights under a config.json that says bfloat16); weights tied in the candidate (one storage
under several names) are interpolated once and stay tied; written with ``save_pretrained`` plus the candidate's
config.json and tokenizer.

``kind="adapter"`` (a peft LoRA adapter, trained on the start = the base with the earlier rounds' adapters merged):
theta - theta0 is the adapter's own update dW = B @ A * s, and theta0 + alpha dW is the same adapter with ``lora_B``
(its weight, and its bias when ``lora_bias``; ``lora_embedding_B`` for embedding layers) multiplied by alpha: dW is
linear in B, and s (lora_alpha / r, rsLoRA's lora_alpha / sqrt(r), rank_pattern / alpha_pattern) is read from the
untouched adapter_config.json, so the result is exact whatever the scaling rule (peft docs,
https://huggingface.co/docs/peft/developer_guides/lora). B rather than A because B's scaling needs no knowledge of s
and also covers B's bias; the adapter is loaded and saved with peft's own ``PeftModel.from_pretrained`` /
``save_pretrained``. DoRA (Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation") on Linear layers is
done exactly too, though it is not linear: peft merges W' = m / ||W0 + dW||_row * (W0 + dW), and with
d = m / ||W0 + dW||, row i of (1 - alpha) W0 + alpha W' is k_i (W0_i + c_i dW_i), k_i = 1 - alpha + alpha d_i,
c_i = alpha d_i / k_i: B's rows scaled by c and the magnitude set to k ||W0 + c dW||_row give exactly that weight.
It needs W0, so the start is loaded with the earlier adapters merged (``earlier``, else the candidate run's
config.yaml ``method.merge_adapters``). Refused in one line: other peft LoRA variants (aLoRA, Arrow, ...; their
update is not B @ A * s), DoRA on embeddings / with fan_in_fan_out / lora_bias / a quantised base, and
modules_to_save / trainable tokens (whole replacement tensors, not updates): export both merged and use kind "full".

An EWC Fisher file in the candidate (final/fisher.safetensors, ``ewc.update_after``) is copied with its anchors
(theta*, target ``trainable``) moved to the interpolated values; F itself stays the one computed at the candidate
(an approximation near alpha = 1; recorded in merge_back.json). Every output is written to a temporary folder beside
``out`` and renamed into place (:func:`distrib_ft.export.atomic_folder`). Bad input: a one-line ``ValueError``.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

FISHER_FILE = "fisher.safetensors"  # distrib_ft.preservation.ewc.FINAL_FILE (not imported: keeps this module light)
RECORD_FILE = "merge_back.json"
KINDS = ("adapter", "full")
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json", "config.json", "generation_config.json")


def _check_alpha(alpha) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not (math.isfinite(alpha)
                                                                             and 0 <= alpha <= 1):
        raise ValueError(f"merge_back alpha: {alpha!r}; give a number in [0, 1] (1 = the candidate, 0 = the start)")
    return float(alpha)


def interpolate(start: str | Path | None, candidate: str | Path, alpha: float, out: str | Path, *, kind: str,
                earlier: list[str | Path] | None = None, overwrite: bool = False) -> Path:
    """Write theta0 + alpha (theta - theta0) to ``out`` and return ``out`` (absolute).

    Args:
        start: kind "full": the Hugging Face model folder the candidate was trained from (theta0). Kind "adapter":
            the base model folder the adapter loads on (``model.name_or_path`` of the round); None: the adapter's
            recorded ``base_model_name_or_path``. The adapter's update does not depend on it (see the module
            docstring); it only gives peft a model to load the adapter onto.
        candidate: kind "full": the candidate's model folder (a run's final/); kind "adapter": its peft LoRA
            adapter folder (a run's final/).
        alpha: in [0, 1]; 1 writes the candidate, 0 the start.
        out: the folder to write (atomically); an existing non-empty one only with ``overwrite``.
        kind: "adapter" or "full" (the registry's artifact kind).
        earlier: kind "adapter", DoRA only: the adapters merged into the base before the candidate trained
            (``method.merge_adapters``, oldest first); None: those in the candidate run's config.yaml (a DoRA
            adapter with no config.yaml beside it, e.g. downloaded from a URL, is refused: pass them). A LoRA
            adapter's interpolation does not depend on them.
        overwrite: replace an existing ``out`` (atomically); a re-run of the same merge-back passes True.

    Raises:
        ValueError: a bad alpha or kind, a missing folder, a DoRA / non-LoRA adapter, models whose tensor names or
            shapes differ, weights tied in the candidate but different in the start, ``out`` taken.
    """
    from distrib_ft.export import ExportError, _check_out

    alpha = _check_alpha(alpha)
    if kind not in KINDS:
        raise ValueError(f"merge_back kind: {kind!r}; use one of {', '.join(KINDS)}")
    try:
        _check_out(out, overwrite)  # before any model loads
        if kind == "full":
            return _interpolate_full(start, candidate, alpha, out, overwrite=overwrite)
        return _interpolate_adapter(start, candidate, alpha, out, earlier=earlier, overwrite=overwrite)
    except ExportError as e:
        raise ValueError(str(e)) from None


def _model_folder(path, what: str) -> Path:
    if path is None:
        raise ValueError(f"merge_back {what}: no folder given; kind 'full' needs the start and the candidate model "
                         "folders")
    p = Path(path).expanduser().resolve()
    if not (p / "config.json").is_file():
        raise ValueError(f"merge_back {what}: {path} is no Hugging Face model folder (no config.json); give the model "
                         "folder (a full fine-tuning run's final/)")
    return p


def _start_model(start, what: str = "start") -> str:
    """The start model to load: a model folder, ``offline:NAME`` (its converted folder) or a hub id in the cache."""
    from distrib_ft.export import ExportError, resolve_base

    if start is not None and (str(start).startswith("offline:") or not Path(start).expanduser().exists()):
        try:
            return resolve_base(str(start), what=f"merge_back {what}")
        except ExportError:
            raise ValueError(f"merge_back {what}: {start} is neither a model folder nor a known offline:NAME nor a "
                             "hub id in the local cache; give the model the round started from") from None
    return str(_model_folder(start, what))


def _outside(out, inputs: list[Path]) -> Path:
    out = Path(out).expanduser().resolve()
    for p in inputs:
        if out == p or p in out.parents:
            raise ValueError(f"merge_back out: {out} is inside {p}, an input; give a folder outside it")
    return out


def _stored_dtypes(folder: Path) -> dict[str, torch.dtype]:
    """The dtype each tensor has in ``folder``'s safetensors files (read from the headers, nothing loaded)."""
    from safetensors import safe_open

    names = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        if f.name == FISHER_FILE:
            continue
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():
                dt = names.get(st.get_slice(k).get_dtype())
                if dt is not None:
                    out[k] = dt
    return out


def _interpolate_full(start, candidate, alpha: float, out, *, overwrite: bool) -> Path:
    from collections import Counter

    from transformers import AutoModelForCausalLM

    from distrib_ft.export import _copy_tokenizer, atomic_folder

    s_dir, c_dir = _start_model(start), _model_folder(candidate, "candidate")
    out = _outside(out, [c_dir] + ([Path(s_dir)] if Path(s_dir).is_dir() else []))
    stored = _stored_dtypes(c_dir)  # a run's final/ holds fp32 master weights even when config.json says bf16
    if not stored:
        raise ValueError(f"merge_back candidate: {c_dir} has no floating tensors in *.safetensors; give a model folder "
                         "saved with safetensors (a run's final/)")
    common = Counter(stored.values()).most_common(1)[0][0]
    cand = AutoModelForCausalLM.from_pretrained(str(c_dir), dtype=torch.float32)  # fp32 holds every dtype exactly
    base = AutoModelForCausalLM.from_pretrained(s_dir, dtype=torch.float32)
    sd_c, sd_s = cand.state_dict(), base.state_dict()
    only = sorted(set(sd_c) ^ set(sd_s))
    if only:
        side = "candidate" if only[0] in sd_c else "start"
        raise ValueError(f"merge_back: {len(only)} tensor name(s) in only one of start {s_dir} and candidate {c_dir} "
                         f"(e.g. {only[0]} only in the {side}); interpolate models of one architecture")
    for name, t in sd_c.items():
        if t.shape != sd_s[name].shape:
            raise ValueError(f"merge_back: {name} has shape {tuple(t.shape)} in the candidate {c_dir} but "
                             f"{tuple(sd_s[name].shape)} in the start {s_dir}; interpolate models of one architecture")
    groups: dict[tuple, list[str]] = {}  # tied weights: one storage under several names
    for name, t in sd_c.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.dtype) if t.numel() else (name,)
        groups.setdefault(key, []).append(name)
    state: dict[str, torch.Tensor] = {}  # what is saved: one tensor object per group, so ties stay ties
    values: dict[str, torch.Tensor] = {}  # the interpolated fp32 values, for the Fisher's anchors
    for names in groups.values():
        first = names[0]
        for other in names[1:]:
            if not torch.equal(sd_s[other], sd_s[first]):
                raise ValueError(f"merge_back: {first} and {other} are tied in the candidate {c_dir} but differ in "
                                 f"the start {s_dir}; interpolate models with the same tie_word_embeddings")
        t = sd_c[first]
        if t.is_floating_point():
            v = torch.lerp(sd_s[first].float(), t, alpha)
            values.update(dict.fromkeys(names, v))
            t = v.to(next((stored[n] for n in names if n in stored), common))  # the candidate's stored dtype
        state.update(dict.fromkeys(names, t))
    with atomic_folder(out, overwrite=overwrite) as tmp:
        cand.save_pretrained(tmp, state_dict=state, safe_serialization=True)
        for f in ("config.json", "generation_config.json"):  # the candidate's own (its dtype field included)
            if (c_dir / f).is_file():
                shutil.copy2(c_dir / f, tmp / f)
        _copy_tokenizer([c_dir, s_dir], tmp)
        fisher = _copy_extras(c_dir, tmp, values, alpha)
        _record(tmp, kind="full", alpha=alpha, start=str(s_dir), candidate=c_dir, fisher=fisher,
                dtypes=sorted({str(d).removeprefix("torch.") for d in stored.values()}),
                how="every floating tensor torch.lerp(start, candidate, alpha) in fp32, stored in the dtype it has "
                    "in the candidate's files; tied weights interpolated once; config.json the candidate's")
    return out


def _interpolate_adapter(start, candidate, alpha: float, out, *, earlier, overwrite: bool) -> Path:
    from peft import PeftModel
    from peft.utils import load_peft_weights

    from distrib_ft import export as ex

    if candidate is None or not Path(candidate).expanduser().is_dir():
        raise ValueError(f"merge_back candidate: {candidate} is no folder; give the round's adapter (its final/)")
    a = ex.describe(candidate)
    if a.kind != "peft" or a.peft_type != "LORA":
        what = a.peft_type or a.owner or a.kind
        raise ValueError(f"merge_back candidate: {a.path} is not a peft LoRA adapter ({what}); "
                         "kind 'adapter' interpolates LoRA adapters only (use kind 'full' for model folders)")
    out = _outside(out, [a.path])
    cfg = ex._read_json(a.path / ex.PEFT_CONFIG)
    for key, what in (("modules_to_save", "whole copies of modules"),
                      ("trainable_token_indices", "whole new token embeddings")):
        if cfg.get(key):
            raise ValueError(f"merge_back candidate: {a.path / ex.PEFT_CONFIG}: {key} holds {what}, not low-rank "
                             "updates; interpolate the merged models with kind 'full' instead")
    dora = bool(cfg.get("use_dora"))
    odd = "a quantised base" if a.quantised else next((k for k in ("fan_in_fan_out", "lora_bias") if cfg.get(k)), None)
    if dora and odd:
        raise ValueError(f"merge_back candidate: {a.path} is a DoRA adapter with {odd}; its interpolation is done for "
                         "DoRA on plain Linear layers only: export the start and the "
                         "candidate merged (`distrib-ft export --merge`) and interpolate them with kind 'full'")
    base_dir = (_start_model(start) if start is not None
                else ex.resolve_base(a.base, what=f"merge_back candidate {a.path / ex.PEFT_CONFIG}"))
    stored = {t.dtype for t in load_peft_weights(str(a.path)).values() if t.is_floating_point()}
    if dora and earlier is None and not (a.path.parent / "config.yaml").is_file():
        raise ValueError(f"merge_back candidate: {a.path} is a DoRA adapter and no run config.yaml beside it says "
                         "which adapters were merged into its start (method.merge_adapters); pass earlier=[...] "
                         "([] for none)")
    start_model = ex._load_base(base_dir)  # fp32
    merged_first = [ex.locate(p) for p in (a.earlier if earlier is None else earlier)] if dora else []
    if merged_first:  # DoRA's update depends on W0: the start is the base with the earlier adapters merged
        start_model = ex.load_merged(start_model, merged_first, what="merge_back earlier adapters")
    model = PeftModel.from_pretrained(start_model, str(a.path))
    scaled = _scale_adapter(model, alpha, a.path)
    if len(stored) == 1:  # keep the adapter's saved dtype (peft loads adapters in fp32)
        dtype = next(iter(stored))
        for n, p in model.named_parameters():
            if ".lora_" in n:
                p.data = p.data.to(dtype)
    values = {n: p.detach().float() for n, p in model.named_parameters()}
    with ex.atomic_folder(out, overwrite=overwrite) as tmp:
        scratch = Path(tempfile.mkdtemp(prefix=".peft-", dir=tmp))
        model.save_pretrained(scratch, safe_serialization=True)
        for f in a.path.iterdir():  # the adapter folder as it is (config, tokenizer, qlora.json, ...)
            if f.name in ("adapter_model.safetensors", "adapter_model.bin", FISHER_FILE):
                continue
            (shutil.copytree if f.is_dir() else shutil.copy2)(f, tmp / f.name)
        (scratch / "adapter_model.safetensors").replace(tmp / "adapter_model.safetensors")
        shutil.rmtree(scratch)
        fisher = _copy_fisher(a.path / FISHER_FILE, tmp / FISHER_FILE, values, alpha)
        how = (f"DoRA on {scaled} layer(s): lora_B rows scaled by c = alpha d / k and the magnitude set to "
               "k ||W0 + c dW||, d = m / ||W0 + dW||, k = 1 - alpha + alpha d (the merged weight is exactly "
               "(1 - alpha) W0 + alpha W1)" if dora else
               f"lora_B (weight, bias; lora_embedding_B) of {scaled} layer(s) multiplied by alpha: dW = B @ A * s "
               "is linear in B")
        _record(tmp, kind="adapter", alpha=alpha, start=base_dir, candidate=a.path, fisher=fisher,
                earlier=[str(p) for p in merged_first], how=how + "; adapter_config.json unchanged")
    return out


def _scale_adapter(model, alpha: float, path: Path) -> int:
    """Turn the loaded adapter into theta0 + alpha dW in place; return the number of LoRA layers changed.

    Plain LoRA: B (and its bias) times alpha. DoRA on a Linear layer (peft: W' = m / ||W0 + dW||_row * (W0 + dW),
    row norms of the [out, in] weight): with d = m / ||W0 + dW||, row i of (1 - alpha) W0 + alpha W' is
    k_i (W0_i + c_i dW_i) with k_i = 1 - alpha + alpha d_i and c_i = alpha d_i / k_i; scaling B's row i by c_i scales
    dW_i by c_i, and the magnitude m''_i = k_i ||W0_i + c_i dW_i|| makes DoRA's merge give exactly that row.
    """
    from peft.tuners.lora import LoraLayer
    from peft.tuners.lora.variants import DoraLinearVariant

    changed = 0
    with torch.no_grad():
        for name, m in model.named_modules():
            if not isinstance(m, LoraLayer):
                continue
            for key in (*m.lora_B.keys(), *m.lora_embedding_B.keys()):
                variant = getattr(m, "lora_variant", {}).get(key)
                if variant is not None and type(variant) is not DoraLinearVariant:  # DoRA embeddings subclass it
                    raise ValueError(f"merge_back candidate: {path}: layer {name} uses peft's "
                                     f"{type(variant).__name__}, whose update is not B @ A * s; interpolate the "
                                     "merged models with kind 'full' instead")
                if variant is None:
                    b = m.lora_B[key] if key in m.lora_B else None
                    for p in ([m.lora_embedding_B[key]] if b is None else list(b.parameters())):
                        p.mul_(alpha)  # dW = B @ A * s is linear in B (and in B's bias)
                else:
                    _scale_dora(m, key, alpha)
                changed += 1
    if not changed:
        raise ValueError(f"merge_back candidate: {path} has no LoRA layers; nothing to interpolate")
    return changed


def _scale_dora(m, key: str, alpha: float) -> None:
    """One DoRA Linear layer moved to (1 - alpha) W0 + alpha W' (see :func:`_scale_adapter`), computed in fp64."""
    if alpha == 1:
        return
    w0 = m.get_base_layer().weight.detach().double()
    dw = m.get_delta_weight(key).detach().double()
    mag = m.lora_magnitude_vector[key].weight
    d = mag.detach().double() / torch.linalg.norm(w0 + dw, dim=1)
    k = 1 - alpha + alpha * d
    if bool((k == 0).any()):
        raise ValueError(f"merge_back: a DoRA magnitude of {alpha:g}-interpolation is zero; try another alpha")
    c = alpha * d / k
    b = m.lora_B[key].weight
    b.copy_((b.double() * c[:, None]).to(b.dtype))
    mag.copy_((k * torch.linalg.norm(w0 + c[:, None] * dw, dim=1)).to(mag.dtype))


def _copy_extras(src: Path, dest: Path, values: dict[str, torch.Tensor], alpha: float) -> str | None:
    """The candidate's other files (not weights or config, not written already); the Fisher with moved anchors."""
    for f in src.iterdir():
        if f.name in _WEIGHT_FILES or f.name == FISHER_FILE or (dest / f.name).exists():
            continue
        if f.name.startswith("model-") and f.suffix == ".safetensors":  # shards of the candidate's weights
            continue
        (shutil.copytree if f.is_dir() else shutil.copy2)(f, dest / f.name)
    return _copy_fisher(src / FISHER_FILE, dest / FISHER_FILE, values, alpha)


def _copy_fisher(src: Path, dest: Path, values: dict[str, torch.Tensor], alpha: float) -> str | None:
    """Copy an EWC Fisher file with its anchors (theta*) set to the interpolated values; None when there is none."""
    if not src.is_file():
        return None
    from distrib_ft.preservation.fisher import load_fisher, save_fisher

    fisher, anchors, info = load_fisher(src)
    missing = [n for n in anchors if n not in values]
    if missing:
        raise ValueError(f"merge_back: {src} has anchors for {len(missing)} parameter(s) the candidate does not have "
                         f"(e.g. {missing[0]}); it belongs to another model")
    moved = {n: values[n] for n in anchors}
    save_fisher(dest, fisher, {**info, "merge_back_alpha": alpha}, moved)
    return (f"{FISHER_FILE}: F as computed at the candidate; "
            + (f"{len(moved)} anchor(s) moved to the interpolated weights" if moved else "no anchors (lora_merged)"))


def _record(folder: Path, **fields) -> None:
    data = {k: (str(v) if isinstance(v, Path) else v) for k, v in fields.items()}
    (folder / RECORD_FILE).write_text(json.dumps(data, indent=2) + "\n")


def choose(alphas: Iterable[float], measure: Callable[[float], dict]) -> dict:
    """Try ``alphas`` largest first; stop at the first whose measurement passes.

    ``measure(alpha)`` returns a dict with at least ``within_budget`` and ``new_task_better`` (bools) and any
    numbers to keep. An alpha passes when both are true.

    Returns:
        ``{"alpha": the passing alpha or None, "table": [{"alpha": a, **measure(a)} for each alpha tried]}``.

    Raises:
        ValueError: no alphas, an alpha outside [0, 1], a repeated alpha, a measurement without the two keys.
    """
    grid = [_check_alpha(a) for a in alphas]
    if not grid:
        raise ValueError("merge_back_alphas: empty; give at least one alpha in (0, 1], e.g. [0.75, 0.5, 0.25]")
    if len(set(grid)) != len(grid):
        raise ValueError(f"merge_back_alphas: {grid} repeats a value; give each alpha once")
    table = []
    for alpha in sorted(grid, reverse=True):
        row = measure(alpha)
        if not isinstance(row, dict) or any(not isinstance(row.get(k), bool)
                                            for k in ("within_budget", "new_task_better")):
            raise ValueError(f"merge_back: the measurement at alpha {alpha:g} is {row!r}; it must hold the bools "
                             "within_budget and new_task_better")
        table.append({"alpha": alpha, **{k: v for k, v in row.items() if k != "alpha"}})
        if row["within_budget"] and row["new_task_better"]:
            return {"alpha": alpha, "table": table}
    return {"alpha": None, "table": table}
