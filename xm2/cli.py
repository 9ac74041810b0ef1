"""The ``xm2`` command: LightningCLI's ``fit``/``validate``/``test`` plus data tools.

    xm2 fit --config config/nano.yaml
    xm2 validate --config config/nano.yaml --ckpt_path <checkpoint>
    xm2 train-tokenizer --vocab_size 4096
    xm2 tokenize --tokenizer_path artifacts/tokenizers/unigram-4096.model
"""

from __future__ import annotations

import logging
import sys
import warnings

from jsonargparse import CLI, set_docstring_parse_options
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import MLFlowLogger

from xm2.data.corpus import source_names
from xm2.data.datamodule import MixtureDataModule
from xm2.data.shards import write_shards
from xm2.data.tokenizer import train_tokenizer
from xm2.module import Xm2Module
from xm2.studies.coord_check import coord_check
from xm2.studies.sweep import sweep


class TrackConfig(SaveConfigCallback):
    """Logs the fully resolved config to the experiment tracker as ``config.yaml``."""

    def save_config(self, trainer, pl_module, stage: str) -> None:
        config = self.parser.dump(self.config, skip_none=False)
        logger = trainer.logger
        if isinstance(logger, MLFlowLogger):
            logger.experiment.log_text(logger.run_id, config, "config.yaml")
        elif logger is not None:
            logger.log_hyperparams({"config": config})


class Xm2CLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # One fact, one home: these data settings follow from the model and its schedule.
        parser.link_arguments("model.schedule.decay_start_step", "data.decay_start_step")
        parser.link_arguments("model.architecture.vocab_size", "data.vocab_size")
        parser.link_arguments("model.architecture.max_seq_len", "data.seq_len")

    def after_fit(self) -> None:
        checkpoint = self.trainer.checkpoint_callback
        if self.trainer.is_global_zero and checkpoint and checkpoint.last_model_path:
            configs = "".join(f"--config {path} " for path in self.config.fit.config or [])
            print(f"\nLast checkpoint: {checkpoint.last_model_path}\nEvaluate it with: xm2 validate "
                  f"{configs}--ckpt_path {checkpoint.last_model_path}")


def quiet_lightning_noise() -> None:
    """Drop two messages that every run prints and no xm2 user can act on."""
    # Lightning's own pytree helper trips a torch deprecation on every validation loop.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    # An advertisement for a hosted logger; xm2 logs to MLflow.
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(
        lambda record: not record.getMessage().startswith("💡 Tip:"))


def tokenize(
    tokenizer_path: str,
    corpus_dir: str = "data/corpus",
    shards_dir: str = "artifacts/shards",
    sources: list[str] | None = None,
) -> str:
    """Tokenize corpus sources into memory-mapped shards (EOS after every document).

    Args:
        tokenizer_path: SentencePiece model to encode with.
        corpus_dir: The bundled corpus.
        shards_dir: Root folder of the shards.
        sources: Sources to tokenize; default all.
    """
    return str(write_shards(corpus_dir, tokenizer_path, shards_dir,
                            sources or source_names(corpus_dir)))


TOOLS = {
    "train-tokenizer": train_tokenizer,
    "tokenize": tokenize,
    "coord-check": coord_check,
    "sweep": sweep,
}


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``xm2`` console script; ``argv`` is for calls from Python."""
    set_docstring_parse_options(attribute_docstrings=True)
    quiet_lightning_noise()
    words = sys.argv[1:] if argv is None else argv
    if words and words[0] in TOOLS:
        CLI(TOOLS, args=words)
        return
    Xm2CLI(
        Xm2Module,
        MixtureDataModule,
        save_config_callback=TrackConfig,
        save_config_kwargs={"save_to_log_dir": False},
        auto_configure_optimizers=False,
        args=argv,
    )


if __name__ == "__main__":
    main()
