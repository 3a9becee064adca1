from eenn.data.datamodule import EENNDataModule

__all__ = ["EENNDataModule"]
