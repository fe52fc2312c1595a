from utils.util import UserError, read_json, write_json

__all__ = ["UserError", "read_json", "write_json"]
