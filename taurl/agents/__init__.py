"""taurl.agents"""
