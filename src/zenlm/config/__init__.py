"""One typed config tree (schema), strict loading (load), cross-section checks (validate)."""

from zenlm.config.load import ConfigError, dump_config, load_config
from zenlm.config.schema import RunConfig

__all__ = ["ConfigError", "RunConfig", "dump_config", "load_config"]
