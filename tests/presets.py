"""Reading model presets from config/model/*.yaml, as the CLI would compose them."""

from pathlib import Path

import yaml

from xm2.config import ModelConfig

CONFIG_DIR = Path(__file__).resolve().parents[1] / "config"


def load_architecture(preset: str) -> ModelConfig:
    data = yaml.safe_load((CONFIG_DIR / "model" / f"{preset}.yaml").read_text())
    return ModelConfig(**data["model"]["architecture"])
