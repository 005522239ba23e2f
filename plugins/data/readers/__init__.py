"""Dataset readers, one module per format; each streams `RawSample`s of one shard."""

from .arrow import ArrowReader
from .json_reader import JsonListReader, JsonlReader
from .parquet import ParquetReader
from .yaml_mixture import YamlMixtureReader

READERS = (ParquetReader(), ArrowReader(), JsonListReader(), JsonlReader(), YamlMixtureReader())

__all__ = ["ArrowReader", "JsonListReader", "JsonlReader", "ParquetReader", "YamlMixtureReader", "READERS"]
