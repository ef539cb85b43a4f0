"""The shipped suites of ``alum-ds evaluate`` (TOML package data): glue, anli, anli_nli."""
