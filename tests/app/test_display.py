"""What the page shows: user text exactly as typed, answers as Markdown without raw HTML or remote images."""

from __future__ import annotations

import pytest

from rwkv_chat.app.display import answer_markdown, user_markdown, user_text

TYPED = ["<script>alert(1)</script>", "<img src=http://example.com/x.png>", "**bold** _it_ `code` [a](b) # h",
         "- item\n1. first\n> quote", "a \\ b & &amp; c", "Hello there", "请介绍一下北京"]


@pytest.mark.parametrize("typed", TYPED)
def test_user_text_round_trips_and_holds_no_live_markup(typed):
    shown = user_markdown(typed)
    assert user_text(shown) == typed
    assert "<" not in shown  # no tag can reach the renderer


def test_markup_is_escaped_where_markdown_would_read_it():
    assert user_markdown("**bold** _it_ `code` [a](b) # mid-line") == \
        "\\*\\*bold\\*\\* \\_it\\_ \\`code\\` \\[a\\](b) # mid-line"
    assert user_markdown("# title\n- item\n2. second\n> quote") == "\\# title\n\\- item\n2\\. second\n&gt; quote"
    assert user_markdown("see http://127.0.0.1:9/x.png") == "see http://127.0.0.1:9/x.png"  # links stay as typed


def test_answers_keep_markdown_but_no_raw_html_or_remote_images():
    answer = "Some **bold**, <b>tag</b> and ![cat](http://example.com/cat.png); code `a<b` and\n```\n<p>x</p>\n```"
    shown = answer_markdown(answer)
    assert "**bold**" in shown and "&lt;b>tag&lt;/b>" in shown
    assert "![" not in shown and "[image: cat](http://example.com/cat.png)" in shown
    assert "`a<b`" in shown and "```\n<p>x</p>\n```" in shown  # code exactly as written
