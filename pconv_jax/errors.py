"""Errors a user can fix. Entry points print their message,
which says what to do, without a traceback."""


class UserError(Exception):
  """A bad configuration, input, file or environment; the message
  says what is wrong and how to fix it."""


class ConfigError(UserError, ValueError):
  """A configuration that cannot work; the message names the field and what to use."""


class DataError(UserError, ValueError):
  """Images, masks or data sets that cannot be read or used."""


class MissingDataError(DataError, FileNotFoundError):
  """A data set, folder or file that is not where the configuration says."""
