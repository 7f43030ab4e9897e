"""Tuned configs per device in YAML: the files shipped in this folder (one per device profile)
and the code that reads and writes them: `entry` (one bucket's winner), `store` (files: read,
validated, merged, written atomically) and `lookup` (the config the engine and the tuner use)."""
from metalforge.results.entry import TIMER_KINDS, Entry
from metalforge.results.lookup import Choice, lookup
from metalforge.results.store import (SCHEMA_VERSION, empty, load, merge, merge_files, save_entries, shipped_path,
                                      user_results_dir, validate, write_atomic)

__all__ = ["TIMER_KINDS", "Entry", "Choice", "lookup", "SCHEMA_VERSION", "empty", "load", "merge", "merge_files",
           "save_entries", "shipped_path", "user_results_dir", "validate", "write_atomic"]
