"""The user's parameter file with some values replaced: each trial's ``trial.param`` and the search's
``best.param``.  The file is rewritten line by line, so its comments, order and layout stay as the user wrote
them; a replaced value keeps its line and its trailing comment, and a key the file did not give is added at the
end under a comment that says where it came from.  Relative paths are written resolved (the new file lives in
another folder), and ``--set`` overrides are written in, so the file alone reproduces the run.
"""

import os

from anna.atomic import atomic_output
from anna.param_types import FilePattern, FilesystemPath
from anna.params import KEY_TABLE, OVERRIDE_LOCATION, key_spec


def _key_lines(lines):
    """{canonical key: index of its line} for the file's 'KEY: value' lines (the parser's own split: comment at
    the first '#', key before the first ':')."""
    found = {}
    for index, raw in enumerate(lines):
        content = raw.split("#", 1)[0]
        if ":" not in content:
            continue
        try:
            found[key_spec(content.split(":", 1)[0]).name] = index
        except KeyError:
            continue
    return found


def _with_value(raw, text):
    """``raw`` ('KEY: old   # comment') with its value replaced by ``text``, key spelling and comment kept."""
    content, hash_, comment = raw.partition("#")
    new = f"{content.split(':', 1)[0]}: {text}"
    if hash_:  # the comment stays in its column when the new value leaves room
        new = (new.ljust(len(content)) if len(new) < len(content) else new + " ") + "#" + comment
    return new


def effective_texts(cfg):
    """{KEY: text} that must be written for ``cfg`` to read the same from another folder: paths given
    relative, resolved; and every ``--set`` override."""
    texts = {}
    for spec in KEY_TABLE:
        key = spec.name
        if not cfg.was_set(key):
            continue
        value = getattr(cfg, key.lower())
        overridden = cfg.location_of(key)[0] == OVERRIDE_LOCATION
        if isinstance(spec.type, (FilesystemPath, FilePattern)):
            if overridden or not os.path.isabs(os.path.expanduser(cfg.text_of(key))):
                texts[key] = value
        elif overridden:
            texts[key] = cfg.text_of(key)
    return texts


def filled_parameter_text(cfg, values, note):
    """The text of ``cfg``'s file with ``values`` ({KEY: text}, on top of :func:`effective_texts`) filled in;
    ``note`` heads the lines added for keys the file does not give."""
    with open(cfg.source, encoding="utf-8-sig") as handle:
        text = handle.read().replace("\r\n", "\n").replace("\r", "\n")
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    wanted = {**effective_texts(cfg), **values}
    where = _key_lines(lines)
    added = []
    for key, value in wanted.items():
        if key in where:
            lines[where[key]] = _with_value(lines[where[key]], value)
        else:
            added.append(f"{key}: {value}")
    if added:
        lines += ["", f"# {note}"] + added
    return "\n".join(lines) + "\n"


def write_filled_parameter_file(cfg, path, values, note):
    """Write :func:`filled_parameter_text` to ``path`` atomically; returns ``path``."""
    with atomic_output(path, "w", encoding="utf-8") as handle:
        handle.write(filled_parameter_text(cfg, values, note))
    return path
