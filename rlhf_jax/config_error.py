"""`ConfigError`, in a module of its own so that pure-Python parts (rlhf_jax.envs) can raise
it without importing rlhf_jax.config (which imports the model, hence jax).
`rlhf_jax.config.ConfigError` is this class."""


class ConfigError(ValueError):
  """A config key or value that cannot work; the message names it."""
