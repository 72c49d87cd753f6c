"""The output policy: the plan (pure: sizes in, inline-or-redirect out) and the files that carry it out.

May import: ``services.storage``, ``services.errors``, ``config``.
"""
