"""The backbone a run uses, resolved once from its flags and passed on: the table entry
(model_config.py) and where its weights come from."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from model_config import BackboneSpec, get_backbone_spec


@dataclass(frozen=True)
class BackboneChoice:
    """`--backbone/--registers` looked up once (`spec`), with `--source/--hub-dir/--weights/--no-pretrained`."""

    spec: BackboneSpec
    source: str = "hub"
    hub_dir: str | None = None
    weights: str | None = None
    pretrained: bool = True

    @classmethod
    def from_flags(cls, flags: Any) -> BackboneChoice:
        """The backbone flags of a parsed command line (cli.add_backbone_args)."""
        return cls(
            get_backbone_spec(flags.backbone, flags.registers),
            source=flags.source,
            hub_dir=flags.hub_dir,
            weights=str(flags.weights) if flags.weights is not None else None,
            pretrained=not flags.no_pretrained,
        )

    @property
    def name(self) -> str:
        return self.spec.hub_name

    def kwargs(self) -> dict[str, Any]:
        """As keyword arguments of `model.DenseModel` / `load_backbone`."""
        return {
            "backbone": self.spec.hub_name,
            "registers": False,  # the hub name says it (`_reg`)
            "source": self.source,
            "hub_dir": self.hub_dir,
            "weights": self.weights,
            "pretrained": self.pretrained,
        }
