"""Wire-level facts: status codes, hypercall codes and packed C layouts.

Every packed layout lives here and nowhere else; decoding happens before a
handler runs (STYLE.md convention 7).
"""
