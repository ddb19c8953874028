"""The trailing `key=value` options of a source spec (`tfrecord:`, `list:`)."""


def split(spec, rest, allowed, what):
    """(head, {option: value}) of a spec's text after its kind.

    A comma inside the head (a glob pattern, a path) stays in it: the options
    are the trailing "key=value" parts only.

    Args:
      spec: The whole spec (named in errors).
      rest: HEAD[,key=value...].
      allowed: The option names the source takes.
      what: What the head is, for errors ("the pattern", "the list file").

    Returns:
      (head: str, options: {name: str value}).

    Raises:
      ValueError: for an option not in `allowed`.
    """
    parts = rest.split(",")
    cut = len(parts)
    while cut > 1 and "=" in parts[cut - 1]:
        cut -= 1
    options = {}
    for part in parts[cut:]:
        key, _, value = part.partition("=")
        if key not in allowed:
            raise ValueError(
                f"Expected options {', '.join(o + '=' for o in allowed)} "
                f"after {what} of {spec}. Received: {key}={value}")
        options[key] = value
    return ",".join(parts[:cut]), options
