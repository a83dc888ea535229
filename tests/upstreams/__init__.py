"""Real upstream processes for tests.

``fake_server.py`` is run as a child process (never imported by the test process); see its
docstring for flags and endpoints, and the ``fake_server_cmd`` / ``fake_model`` fixtures in
``tests/conftest.py`` for building its command line.
"""
