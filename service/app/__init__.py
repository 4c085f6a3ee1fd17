"""The inspection REST service (FastAPI). Build it with `service.app.main.create_app`."""
