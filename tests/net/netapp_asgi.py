"""The net tests' app as an ASGI application, for ``uvicorn``/``hypercorn`` on the command line."""

from rtcore.asgi import asgi_app
from tests.net.netapp import app

asgi = asgi_app(app)
