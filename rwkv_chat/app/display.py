"""How chat text is shown in the page's Markdown chat bubbles.

Promises:
- `user_markdown(text)`: what a person typed, shown exactly as typed: HTML and Markdown syntax are escaped, so
  `<img src=…>` shows as text and fetches nothing, and `**x**` shows its asterisks. `user_text` is its inverse
  (the page's edit box hands back the displayed source).
- `answer_markdown(text)`: a model's answer rendered as Markdown, without raw HTML (tags show as text) and without
  remote images (an image becomes a link to it); code spans and fenced blocks are left exactly as written.
Knows nothing of Gradio, sessions or models: strings in, strings out. What is stored and what the APIs return are
the texts themselves, never these display forms.
"""

from __future__ import annotations

import html
import re

_INLINE_SPECIAL = re.compile(r"([\\`*_\[\]|~])")  # markup anywhere in a line
_LINE_START = re.compile(r"^([ \t]*)([#+\-]|\d+(?=[.)]))", re.MULTILINE)  # headings, lists (and "1." / "1)")
_ESCAPED = re.compile(r"\\([\\`*_\[\]|~#+\-.)])")
_CODE = re.compile(r"(```[\s\S]*?(?:```|$)|`[^`\n]*`)")
_IMAGE = re.compile(r"!\[([^\]]*)\]\(")


def user_markdown(text: str) -> str:
    escaped = _INLINE_SPECIAL.sub(r"\\\1", html.escape(text, quote=False))
    return _LINE_START.sub(_escape_line_start, escaped)


def _escape_line_start(match: re.Match) -> str:
    indent, mark = match.group(1), match.group(2)
    if mark.isdigit():  # "1." -> "1\.": the list marker is the punctuation after the number
        return indent + mark + "\\"
    return indent + "\\" + mark


def user_text(markdown: str) -> str:
    return html.unescape(_ESCAPED.sub(r"\1", markdown))


def answer_markdown(text: str) -> str:
    pieces = _CODE.split(text)
    for index in range(0, len(pieces), 2):  # prose; the odd pieces are code, kept as written
        prose = pieces[index].replace("&", "&amp;").replace("<", "&lt;")
        pieces[index] = _IMAGE.sub(r"[image: \1](", prose)
    return "".join(pieces)
