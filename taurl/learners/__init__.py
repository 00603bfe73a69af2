"""taurl.learners"""
