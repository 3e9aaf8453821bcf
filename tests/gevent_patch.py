"""A pytest plugin, loaded before every other (``-p tests.gevent_patch`` in setup.cfg), that
monkey-patches the standard library for gevent the way gunicorn's gevent worker does before
it loads the app. Other plugins (schemathesis, anyio) import ssl and sockets early; patching
here, first, means they get the patched modules too.
"""

from gevent import monkey

monkey.patch_all()
