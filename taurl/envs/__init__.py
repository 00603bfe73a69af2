"""taurl.envs"""
