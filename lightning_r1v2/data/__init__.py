"""Records, the synthetic task, collators and the DataModule."""
from .datamodule import R1V2DataModule
from .records import RecordError, read_records

__all__ = ["R1V2DataModule", "RecordError", "read_records"]
