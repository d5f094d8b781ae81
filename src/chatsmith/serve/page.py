"""The web chat page served at `GET /` (plain HTML/CSS/JS in one string, nothing fetched from elsewhere)."""

PAGE_HTML = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>chatsmith</title></head>
<body><h1>chatsmith serve</h1><p>The API is at <code>/v1</code>.</p></body></html>
"""
