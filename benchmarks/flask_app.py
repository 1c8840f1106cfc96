"""A small Flask app, for the memory benchmark: what a typical user's worker holds."""

from __future__ import annotations

from flask import Flask


def hello() -> str:
    return "hello\n"


app = Flask(__name__)
app.add_url_rule("/", view_func=hello)
