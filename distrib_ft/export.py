"""Export a trained run as a plain Hugging Face model, combine LoRA adapters, evaluate several adapters together.

``distrib-ft export`` (:func:`export`): a run's final/ (or any peft adapter or model folder) to a folder that
``AutoModelForCausalLM.from_pretrained`` loads. ``--merge`` folds a LoRA / DoRA adapter into its base with
peft's ``merge_and_unload`` (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models":
W' = W + B @ A * alpha / r; DoRA, Liu et al. 2024, also renormalises W's columns), the base loaded in fp32.
A QLoRA adapter (Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs") merges into the
*unquantised* base. Adapters that are no change of the base weights -- prompt tuning's virtual tokens (Lester
et al. 2021), bottleneck adapters' non-linear blocks (Houlsby et al. 2019), BEFT biases on layers that have no
bias -- are exported as they are, with a README.txt saying how to load them.

``distrib-ft merge`` (:func:`merge_adapters`): LoRA adapters of one base combined into one adapter with peft's
``add_weighted_adapter``: ``cat`` (exact: the sum of the weighted updates, rank = the sum of the ranks),
``linear`` (A's and B's averaged separately: an approximation, ranks must agree), ``ties`` (Yadav et al. 2023,
"TIES-Merging: Resolving Interference When Merging Models") and ``dare_ties`` (Yu et al. 2024, "Language Models
are Super Mario: Absorbing Abilities from Homologous Models as a Free Lunch"), both on A and B with ``density``.

``distrib-ft eval --model A --model B`` (:func:`load_merged`): the base with each adapter merged in order,
W + sum_i B_i A_i s_i for LoRA (as ``method.merge_adapters`` does before training).

Every output folder is written beside its destination and renamed into place: a failed command leaves no
half-written folder. Input problems raise :class:`ExportError` (one line; the CLI's exit code 2).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from distrib_ft.model import TORCH_DTYPES
from distrib_ft.runtime import storage

PEFT_CONFIG = "adapter_config.json"
BOTTLENECK_CONFIG = "bottleneck_config.json"
COMBINATIONS = ("linear", "cat", "ties", "dare_ties")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                    "vocab.json", "merges.txt", "chat_template.jinja", "added_tokens.json")


class ExportError(Exception):
    """An input problem found before anything was written; printed as one line (exit code 2)."""


class NotMergeable(ExportError):
    """An adapter that does not merge into the base weights (``reason``: why)."""

    def __init__(self, what: str, path: Path, reason: str):
        super().__init__(f"{what}: {path} cannot be merged into the base weights ({reason}); evaluate or export it "
                         "on its own")
        self.reason = reason


@dataclass
class Artifact:
    """What a folder holds, as far as exporting and merging are concerned."""

    path: Path  # the folder itself (a run's final/ when a run folder was given)
    kind: str  # "peft" (adapter_config.json), "own" (a method's own format) or "model" (config.json)
    base: str | None = None  # the base model the adapter was trained on (as recorded), None for a model
    peft_type: str | None = None  # "LORA", "PROMPT_TUNING", "BEFT", ... for kind "peft"
    owner: str | None = None  # the registered method whose own format it is (its owns_final)
    quantised: bool = False  # a QLoRA adapter: trained on a quantised base
    earlier: list[str] = field(default_factory=list)  # the run's method.merge_adapters (merged before it trained)
    not_mergeable: str | None = None  # why it cannot be merged into the base weights (None: it can, or a model)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ExportError(f"{path}: cannot read it as JSON ({e}); is the folder complete?") from None


def locate(path: str | Path) -> Path:
    """The folder to export: a run folder's final/ (training.output_dir), else the folder itself.

    Raises:
        ExportError: the folder does not exist, or it is a run folder with no final/ (only rejected/ or nothing).
    """
    p = Path(path).expanduser().resolve()
    if not p.is_dir():
        raise ExportError(f"{path}: no such folder; give a run's output_dir, its final/ folder or an adapter folder")
    if (p / "final").is_dir():
        return p / "final"
    if not any((p / f).is_file() for f in (PEFT_CONFIG, BOTTLENECK_CONFIG, "config.json")) and (
            (p / "rejected").is_dir() or (p / "summary.json").is_file() or (p / "checkpoints").is_dir()):
        hint = (f"its model is out of the forgetting budget in {p / 'rejected'}; give that folder to export it anyway"
                if (p / "rejected").is_dir() else "the run has not finished")
        raise ExportError(f"{path}: a run folder with no final/: {hint}")
    return p


def _run_config(folder: Path) -> dict:
    """The job that wrote ``folder`` (a run's final/ or rejected/): its config.yaml beside it, else {}."""
    cfg = folder.parent / "config.yaml"
    if folder.name not in ("final", "rejected") or not cfg.is_file():
        return {}
    import yaml

    try:
        return yaml.safe_load(cfg.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}


def describe(path: str | Path) -> Artifact:
    """What ``path`` (a run folder, a final/ folder, an adapter or a model folder) holds.

    Raises:
        ExportError: none of peft adapter (adapter_config.json), a method's own adapter format, a Hugging Face model.
    """
    from distrib_ft.methods import METHODS

    folder = locate(path)
    run = _run_config(folder)
    earlier = [str(p) for p in (run.get("method") or {}).get("merge_adapters") or []]
    run_base = (run.get("model") or {}).get("name_or_path")
    owner = next((cls for cls in METHODS.values() if hasattr(cls, "owns_final") and cls.owns_final(folder)), None)
    owner_name = owner.name if owner is not None else None
    if (folder / PEFT_CONFIG).is_file():
        cfg = _read_json(folder / PEFT_CONFIG)
        peft_type = str(cfg.get("peft_type", "")).upper()
        if not peft_type:
            raise ExportError(f"{folder / PEFT_CONFIG}: no peft_type; not a peft adapter config")
        a = Artifact(folder, "peft", base=cfg.get("base_model_name_or_path") or run_base, peft_type=peft_type,
                     owner=owner_name, earlier=earlier)
        a.quantised = owner_name == "qlora" or (run.get("method") or {}).get("type") == "qlora" or any(
            "quant" in f.name.lower() for f in folder.iterdir() if f.name != PEFT_CONFIG)
        if not earlier and (folder / "qlora.json").is_file():  # QLoRA records its merge_adapters in final/
            a.earlier = [str(p) for p in _read_json(folder / "qlora.json").get("merge_adapters") or []]
        if _is_prompt_learning(peft_type):
            a.not_mergeable = (f"{peft_type.lower()} prepends virtual tokens to the input; there is no weight to "
                               "merge them into")
        elif owner is not None and getattr(owner, "mergeable", True) is False:
            a.not_mergeable = f"a {owner_name} adapter does not change the base weights linearly"
        return a
    if owner is not None or (folder / BOTTLENECK_CONFIG).is_file():
        name = owner_name or "adapter"
        base = None
        if (folder / BOTTLENECK_CONFIG).is_file():
            base = _read_json(folder / BOTTLENECK_CONFIG).get("base_model_name_or_path")
        a = Artifact(folder, "own", base=base or run_base, owner=name, earlier=earlier)
        if name == "adapter":  # method.type adapter: bottleneck adapters
            a.not_mergeable = "a bottleneck adapter adds non-linear blocks; they cannot be folded into the base weights"
        elif getattr(owner, "mergeable", False) is False:
            a.not_mergeable = f"a {name} adapter in its own format does not change the base weights linearly"
        return a
    if (folder / "config.json").is_file():
        if not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
            raise ExportError(f"{folder}: config.json but no weights (*.safetensors); not a complete model folder")
        return Artifact(folder, "model")
    raise ExportError(f"{path}: holds neither a peft adapter (adapter_config.json), a bottleneck adapter "
                      "(bottleneck_config.json) nor a Hugging Face model (config.json); give a run's output_dir, "
                      "its final/ folder or an adapter folder")


def _is_prompt_learning(peft_type: str) -> bool:
    from peft.utils import PeftType

    return peft_type in {PeftType.PROMPT_TUNING.value, PeftType.P_TUNING.value, PeftType.PREFIX_TUNING.value,
                         PeftType.MULTITASK_PROMPT_TUNING.value, PeftType.ADAPTION_PROMPT.value,
                         getattr(PeftType, "CPT", PeftType.PROMPT_TUNING).value}


def resolve_base(name: str | None, *, what: str, override: str | None = None) -> str:
    """The base model folder (or hub id) to load: ``override`` (--base), else the adapter's recorded base.

    ``offline:NAME`` is resolved to its converted folder. Raises ExportError when it names no model here.
    """
    name = override or name
    if not name:
        raise ExportError(f"{what}: records no base model (base_model_name_or_path); pass --base MODEL_FOLDER")
    if name.startswith("offline:"):
        from distrib_ft.model import resolve_offline_model

        try:
            return str(resolve_offline_model(name))
        except (ValueError, FileNotFoundError, RuntimeError) as e:
            raise ExportError(f"{what}: base model {name}: {e}") from None
    p = Path(name).expanduser()
    if p.is_dir() and (p / "config.json").is_file():
        return str(p.resolve())
    flag = "--base" if override else "--base MODEL_FOLDER"
    if p.is_absolute() or p.exists() or name.startswith("."):
        raise ExportError(f"{what}: base model {name} not found (no config.json there); pass {flag} with the folder "
                          "of the model the adapter was trained on")
    from transformers import AutoConfig

    try:  # a hub id: usable only where the hub (or its cache) is reachable
        AutoConfig.from_pretrained(name)
    except (OSError, ValueError):
        raise ExportError(f"{what}: base model {name} not found locally or on the hub; pass {flag} with the folder "
                          "of the model the adapter was trained on") from None
    return name


def _load_base(base: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)


def _config_dtype(folder: str) -> str:
    """The dtype a model folder was saved in (config.json's dtype / torch_dtype), float32 when it says none."""
    cfg_file = Path(folder) / "config.json"
    cfg = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
    value = str(cfg.get("dtype") or cfg.get("torch_dtype") or "float32").removeprefix("torch.")
    return value if value in TORCH_DTYPES else "float32"


@contextlib.contextmanager
def atomic_folder(out: str | Path, *, overwrite: bool = False):
    """Yield a temporary folder beside ``out``; on success it becomes ``out`` (an old ``out`` is replaced).

    Raises:
        ExportError: ``out`` is a file, or a non-empty folder and ``overwrite`` is false.
    """
    out = _check_out(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        storage.plain_modes(tmp, tree=True)  # mkdtemp's 0700, safetensors' 0600: as a plain mkdir / open
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _copy_tokenizer(sources: list[str | Path], dest: Path) -> bool:
    """Save the tokenizer of the first source folder that has one into ``dest``; False when none has one."""
    from transformers import AutoTokenizer

    for src in sources:
        if src is None or not Path(src).is_dir():
            continue
        if not any((Path(src) / f).is_file() for f in _TOKENIZER_FILES):
            continue
        try:
            AutoTokenizer.from_pretrained(str(src)).save_pretrained(dest)
        except (OSError, ValueError):  # an incomplete tokenizer: copy its files as they are
            for f in _TOKENIZER_FILES:
                if (Path(src) / f).is_file():
                    shutil.copy2(Path(src) / f, dest / f)
        return True
    return False


def _readme(a: Artifact, base: str | None, out: Path, reason: str | None) -> str:
    base = base or a.base or "BASE_MODEL"
    lines = [f"An adapter exported by distrib-ft from {a.path}", f"Base model: {base}", ""]
    if reason:
        lines += [f"It is not merged into the base weights: {reason}.", ""]
    if a.kind == "peft":
        lines += ["Load it with peft:", "",
                  "    from transformers import AutoModelForCausalLM, AutoTokenizer",
                  "    from peft import PeftModel",
                  f"    base = AutoModelForCausalLM.from_pretrained({base!r})",
                  f"    model = PeftModel.from_pretrained(base, {str(out)!r})",
                  f"    tokenizer = AutoTokenizer.from_pretrained({str(out)!r})", ""]
        if a.not_mergeable and _is_prompt_learning(a.peft_type or ""):
            lines += ["The model's logits have the virtual tokens' positions in front of the input's: drop the first",
                      "num_virtual_tokens positions (adapter_config.json).", ""]
        if a.owner is not None:
            lines += [f"With distrib-ft installed, this loads it as its method ({a.owner}) does"
                      + (" (peft 0.21's generate for prompt tuning is fixed there)" if a.owner == "prompt_tuning"
                         else " (on the quantised base it trained on)" if a.quantised else "") + ":", "",
                      "    # from distrib_ft.methods import load_trained",
                      f"    # model = load_trained({base!r}, {str(out)!r}, "
                      "load_model=AutoModelForCausalLM.from_pretrained)", ""]
        if a.quantised:
            lines += ["It was trained on a quantised base (QLoRA): on the full-precision base above its logits differ",
                      "from the trained model's by the quantisation error.", ""]
    else:
        lines += ["Load it with distrib-ft (pip install distrib-ft), which knows this adapter format:", "",
                  "    from transformers import AutoModelForCausalLM",
                  "    from distrib_ft.methods import load_trained",
                  f"    model = load_trained({base!r}, {str(out)!r},",
                  "                         load_model=AutoModelForCausalLM.from_pretrained)", ""]
        if a.owner in (None, "adapter"):
            lines += ["(For a bottleneck adapter this is distrib_ft.methods.bottleneck.load_bottleneck(base_model, "
                      "folder).)", ""]
    if a.earlier:
        lines += ["The run merged these adapters into the base before it trained; merge them first, in order:",
                  *[f"    {p}" for p in a.earlier], ""]
    return "\n".join(lines)


def export(path: str | Path, out: str | Path, *, merge: bool = False, dtype: str | None = None,
           overwrite: bool = False, base: str | None = None) -> str:
    """``distrib-ft export``: write ``path``'s model or adapter to ``out``; return the line to print.

    Args:
        path: a run folder (training.output_dir: its final/ is exported), a final/ folder, a peft adapter folder
            or a Hugging Face model folder.
        out: the folder to write (atomically; an existing non-empty one only with ``overwrite``).
        merge: merge a LoRA/DoRA (or other weight-merging peft) adapter into its base (fp32) and write the whole
            model; adapters that cannot merge are exported as they are, with a README.txt.
        dtype: the dtype of a written model (float32, bfloat16, float16); default: the base's saved dtype.
        overwrite: replace a non-empty ``out``.
        base: the base model to merge into instead of the adapter's recorded base_model_name_or_path.

    Raises:
        ExportError: bad input (missing folder, neither adapter nor model, base model not found, ``out`` taken).
    """
    if dtype is not None and dtype not in TORCH_DTYPES:
        raise ExportError(f"--dtype: {dtype!r}; use one of {', '.join(TORCH_DTYPES)}")
    a = describe(path)
    out = _check_out(out, overwrite)
    if out == a.path or a.path in out.parents:
        raise ExportError(f"--out: {out} is inside what it exports ({a.path}); give a folder outside it")
    if a.kind == "model":
        dt = dtype or _config_dtype(str(a.path))
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(a.path), dtype=TORCH_DTYPES[dt])
        with atomic_folder(out, overwrite=overwrite) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            _copy_tokenizer([a.path], tmp)
        return f"Exported the model {a.path} ({dt}{'; a whole model: nothing to merge' if merge else ''}) to {out}"
    if not merge:
        _copy_adapter(a, out, overwrite=overwrite, base=base)
        return f"Exported the adapter {a.path} as it is to {out} (how to load it: README.txt)"
    if a.not_mergeable is None:
        base_path = resolve_base(a.base, what=str(a.path / PEFT_CONFIG), override=base)
        dt = dtype or _config_dtype(base_path)
        earlier = [locate(p) for p in a.earlier]
        try:
            model = load_merged(_load_base(base_path), [*earlier, a.path], what=str(a.path))
        except NotMergeable as e:
            a.not_mergeable = e.reason
    if a.not_mergeable is not None:
        _copy_adapter(a, out, overwrite=overwrite, base=base, reason=a.not_mergeable)
        return f"Not merged: {a.not_mergeable}; exported the adapter as it is to {out} (how to load it: README.txt)"
    with atomic_folder(out, overwrite=overwrite) as tmp:
        model.to(TORCH_DTYPES[dt]).save_pretrained(tmp, safe_serialization=True)
        _copy_tokenizer([a.path, base_path], tmp)
    chain = f" after the run's {len(earlier)} earlier adapter(s) (method.merge_adapters)" if earlier else ""
    if a.quantised:
        return (f"Exported the merged model to {out} ({dt}): the unquantised base {base_path} + the QLoRA adapter"
                f"{chain} (it trained on a quantised base; this model's logits differ from it by the quantisation "
                "error)")
    return f"Exported the merged model to {out} ({dt}): {base_path} + the {a.peft_type} adapter {a.path}{chain}"


def _check_out(out: str | Path, overwrite: bool) -> Path:
    """``out`` made absolute, refused early (before any model loads) when it is a file or taken."""
    out = Path(out).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out: {out} is a file; give a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"--out: {out} exists and is not empty; use --overwrite, or another folder")
    return out


def _copy_adapter(a: Artifact, out: Path, *, overwrite: bool, base: str | None, reason: str | None = None) -> None:
    """The adapter folder as it is, plus a tokenizer (its own, else the base's) and README.txt (how to load it)."""
    with atomic_folder(out, overwrite=overwrite) as tmp:
        for f in a.path.iterdir():
            if f.is_file():
                shutil.copy2(f, tmp / f.name)
            elif f.is_dir():
                shutil.copytree(f, tmp / f.name)
        if not _copy_tokenizer([a.path], tmp) and a.base and Path(a.base).is_dir():
            _copy_tokenizer([a.base], tmp)
        (tmp / "README.txt").write_text(_readme(a, base or a.base, out, reason))


def load_merged(model: torch.nn.Module, adapters: list[str | Path], *, what: str = "--model") -> torch.nn.Module:
    """``model`` with each peft adapter merged into its weights, in order (W + sum_i B_i A_i s_i for LoRA).

    Raises:
        NotMergeable: an adapter that does not merge into weights (prompt tuning, bottleneck, BEFT on layers with
            no bias).
        ExportError: no adapter at all.
    """
    from peft import PeftModel

    for path in adapters:
        a = describe(path)
        if a.kind != "peft" or a.not_mergeable:
            raise NotMergeable(what, a.path, a.not_mergeable or f"a {a.owner or a.kind} adapter is no peft adapter")
        peft_model = PeftModel.from_pretrained(model, str(a.path))
        if a.peft_type == "BEFT":
            missing = [n for n, m in peft_model.named_modules() if hasattr(m, "beft_bias")
                       and getattr(m.get_base_layer(), "bias", None) is None]
            if missing:
                raise NotMergeable(what, a.path, f"a BEFT bias adapter on layers that have no bias ({len(missing)}, "
                                   f"e.g. {missing[0].removeprefix('base_model.model.')}) has nothing to merge into")
        model = peft_model.merge_and_unload()
    return model


def merge_adapters(adapters: list[str | Path], out: str | Path, *, method: str, weights: list[float] | None = None,
                   density: float | None = None, overwrite: bool = False, base: str | None = None,
                   seed: int = 0) -> str:
    """``distrib-ft merge``: combine LoRA adapters of one base into one peft adapter in ``out``; return the line.

    ``out`` holds a normal peft adapter (``PeftModel.from_pretrained`` loads it), the first adapter's tokenizer
    and merge.json (the inputs, method, weights, density, base).

    Raises:
        ExportError: fewer than two adapters, a non-LoRA (or DoRA) adapter, adapters of different bases, ranks that
            ``linear`` / ``ties`` / ``dare_ties`` cannot combine, weights that do not match the adapters.
    """
    if method not in COMBINATIONS:
        raise ExportError(f"--method: {method!r}; use one of {', '.join(COMBINATIONS)}")
    if len(adapters) < 2:
        raise ExportError("--adapters: give at least two adapter folders to merge")
    weights = [1.0] * len(adapters) if not weights else [float(w) for w in weights]
    if len(weights) != len(adapters):
        raise ExportError(f"--weights: {len(weights)} weight(s) for {len(adapters)} adapters; give one per adapter")
    if method in ("ties", "dare_ties"):
        density = 0.5 if density is None else density
        if not 0 < density <= 1:
            raise ExportError(f"--density: {density}; give a value in (0, 1]")
    elif density is not None:
        raise ExportError(f"--density: only for ties and dare_ties, not {method}")
    arts = [describe(p) for p in adapters]
    _check_out(out, overwrite)
    for a in arts:
        if a.kind != "peft" or a.peft_type != "LORA":
            raise ExportError(f"--adapters: {a.path} is not a LoRA adapter ({a.peft_type or a.owner or a.kind}); "
                              "only LoRA adapters can be merged")
        cfg = _read_json(a.path / PEFT_CONFIG)
        if cfg.get("use_dora"):
            raise ExportError(f"--adapters: {a.path} is a DoRA adapter: its update is not additive; "
                              "use distrib-ft export --merge on each instead")
        if cfg.get("use_rslora"):
            raise ExportError(f"--adapters: {a.path} uses rsLoRA scaling, which peft's add_weighted_adapter does not "
                              "keep; merge LoRA adapters without use_rslora")
        if a.earlier:
            raise ExportError(f"--adapters: {a.path} was trained on a base with earlier adapters merged in "
                              "(method.merge_adapters); merging it with others on the plain base changes its meaning")
    bases = [resolve_base(a.base, what=str(a.path / PEFT_CONFIG), override=base) for a in arts]
    other = next((i for i, b in enumerate(bases) if b != bases[0]), None)
    if other is not None:
        raise ExportError(f"--adapters: different base models ({bases[0]} for {arts[0].path}, {bases[other]} for "
                          f"{arts[other].path}); merge adapters of one base only")
    ranks = [_read_json(a.path / PEFT_CONFIG) for a in arts]
    rank_sets = [{c.get("r"), *(c.get("rank_pattern") or {}).values()} for c in ranks]
    if method != "cat" and len({frozenset(s) for s in rank_sets}) > 1:
        raise ExportError(f"--method {method}: the adapters have different ranks "
                          f"({', '.join(str(c.get('r')) for c in ranks)}); use --method cat")
    from peft import PeftModel

    torch.manual_seed(seed)  # dare_ties drops entries at random
    names = [f"input{i}" for i in range(len(arts))]
    model = PeftModel.from_pretrained(_load_base(bases[0]), str(arts[0].path), adapter_name=names[0])
    for name, a in zip(names[1:], arts[1:]):
        model.load_adapter(str(a.path), adapter_name=name)
    try:
        model.add_weighted_adapter(names, weights, adapter_name="default", combination_type=method,
                                   density=density)
    except (ValueError, TypeError) as e:
        raise ExportError(f"--adapters: peft cannot combine them with {method}: {str(e).splitlines()[0]}") from None
    record = {"method": method, "weights": weights, "density": density, "seed": seed, "base": bases[0],
              "adapters": [{"path": str(a.path), "r": c.get("r"), "lora_alpha": c.get("lora_alpha"),
                            "target_modules": c.get("target_modules")} for a, c in zip(arts, ranks)],
              "peft": __import__("peft").__version__}
    with atomic_folder(out, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp, selected_adapters=["default"], safe_serialization=True)
        _copy_tokenizer([a.path for a in arts] + [bases[0]], tmp)
        (tmp / "merge.json").write_text(json.dumps(record, indent=2) + "\n")
    r = model.peft_config["default"].r
    return (f"Merged {len(arts)} LoRA adapters ({method}, weights {', '.join(f'{w:g}' for w in weights)}"
            f"{f', density {density:g}' if density is not None else ''}) into one adapter of rank {r} on {bases[0]}: "
            f"{Path(out).expanduser().resolve()}")
