"""Route modules: one APIRouter each, wired by `service.app.main.create_app`."""
