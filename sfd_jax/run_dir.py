"""What every trainer does with its workdir: refuse another recipe's workdir before writing anything, write
``config.json``, and open the Orbax checkpointer (``checkpoints/``) only once the run is known to start."""
from __future__ import annotations

import json
import os

import jax

from sfd_jax.checkpoint import Checkpointer, config_from_json
from sfd_jax.cli_utils import UsageError


class RunDir:
    """Mixin for a trainer with ``self.config``, ``self.workdir``; subclasses set ``SAME_RECIPE_KEYS``."""
    SAME_RECIPE_KEYS: tuple[str, ...] = ("mode",)

    def _init_run_dir(self, config, workdir: str) -> None:
        self.config = config
        self.workdir = os.path.abspath(workdir)
        self.is_main = jax.process_index() == 0
        self.check_workdir()
        self.ckpt_dir = os.path.join(self.workdir, "checkpoints")
        self.ckpt = None  # created once the run is known to start: a failed start writes nothing

    def check_workdir(self) -> None:
        """A workdir of another recipe (any of ``SAME_RECIPE_KEYS`` differs) is refused."""
        path = os.path.join(self.workdir, "config.json")
        if os.path.exists(path):
            saved = config_from_json(json.load(open(path)))
            for key in self.SAME_RECIPE_KEYS:
                a, b = _plain(get_dotted(saved, key)), _plain(get_dotted(self.config, key))
                if json.dumps(a, sort_keys=True) != json.dumps(b, sort_keys=True):
                    raise UsageError(f"workdir {self.workdir} holds a run with a different {key} ({a} vs {b}); "
                                     "use a new --workdir")

    def write_config(self) -> None:
        if self.is_main:
            os.makedirs(self.workdir, exist_ok=True)
            with open(os.path.join(self.workdir, "config.json"), "w") as f:
                f.write(self.config.to_json(indent=2))

    def _open_checkpointer(self) -> Checkpointer:
        if self.ckpt is None:
            t = self.config.training
            self.ckpt = Checkpointer(self.ckpt_dir, max_to_keep=int(t.max_to_keep) or None,
                                     async_save=bool(t.async_checkpoints))
        return self.ckpt

    def latest_step(self) -> int | None:
        if not os.path.isdir(self.ckpt_dir) or not any(n.isdigit() for n in os.listdir(self.ckpt_dir)):
            return None
        return self._open_checkpointer().latest_step()


def with_shardings(tree, shardings):
    """ShapeDtypeStructs of ``tree`` carrying the matching leaf of ``shardings`` (restore targets)."""
    return jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def get_dotted(cfg, dotted: str):
    node = cfg
    for part in dotted.split("."):
        node = node.get(part) if hasattr(node, "get") else None
    return node


def _plain(v):
    if hasattr(v, "to_dict"):
        v = v.to_dict()
    return json.loads(json.dumps(v, default=str))
