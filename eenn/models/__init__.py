from eenn.models.multi_exit import MultiExitNetwork, build_multi_exit

__all__ = ["MultiExitNetwork", "build_multi_exit"]
