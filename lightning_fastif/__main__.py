"""Config-driven training: ``python -m lightning_fastif fit --config examples/mnli_hans/config.yaml``.

The model, data, logger and callbacks (for example :class:`InfluenceCallback`) all come from YAML,
each given by ``class_path`` and ``init_args``.
"""

from __future__ import annotations

from pytorch_lightning.cli import LightningCLI


def main(args: list[str] | None = None) -> LightningCLI:
    """Run the Lightning command line (``fit``, ``validate``, ``test``, ``predict``)."""
    return LightningCLI(args=args, save_config_kwargs={"overwrite": True})


if __name__ == "__main__":
    main()
