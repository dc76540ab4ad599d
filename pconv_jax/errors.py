"""Errors a user can fix. Entry points print their message,
which says what to do, without a traceback."""

import sys

from absl import flags


class UserError(Exception):
  """A bad configuration, input, file or environment; the message
  says what is wrong and how to fix it."""


class ConfigError(UserError, ValueError):
  """A configuration that cannot work; the message names the field and what to use."""


class DataError(UserError, ValueError):
  """Images, masks or data sets that cannot be read or used."""


class MissingDataError(DataError, FileNotFoundError):
  """A data set, folder or file that is not where the configuration says."""


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing for `app.run(..., flags_parser=parse_flags)`: a bad flag, or a
  `--config.FIELD=...` override that names no field, stops with one line (ml_collections' "Did you
  mean" hint included), not a traceback."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as error:
    sys.exit(f"error: {error}. Pass --helpfull to see the flags.")
  except (AttributeError, KeyError) as error:  # ml_collections, for an unknown field.
    text = str(error.args[0] if error.args else error).replace("\\n", "\n").replace("\\'", "'")
    field, _, hint = text.strip("'\" \n").partition("\n")
    field = field.strip("'")
    overrides = [a.split("=")[0] for a in argv if a.startswith("--config.")]
    flag = next((a for a in overrides if field in a.split(".")), None)
    if flag is None:
      raise  # Not an override's field: an error in the config file, to see with its traceback.
    sys.exit(f"error: {flag}: the config has no field {field!r}. {hint}".strip())
