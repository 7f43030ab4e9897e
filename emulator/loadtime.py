"""Refusing code that would run when a kernel's library loads, before it is linked or loaded.

A kernel is called, never loaded for effect: its object file may hold code and data, but no
constructors or destructors (.init_array, .fini_array, .preinit_array, .ctors, .dtors, .init,
.fini — a program-scope constant initialised by a function call compiles to one), no indirect
functions (STT_GNU_IFUNC: their resolvers run at load time), and no section the compiler would not
make itself (a custom section, or one whose name smuggles assembler directives). Read straight
from the ELF file: no tool between the bytes and the verdict."""
from __future__ import annotations

import re
import struct
from pathlib import Path

_SHT_SYMTAB, _SHT_INIT_ARRAY, _SHT_FINI_ARRAY, _SHT_PREINIT_ARRAY = 2, 14, 15, 16
_SHF_WRITE, _SHF_EXECINSTR = 0x1, 0x4
_STT_GNU_IFUNC = 10

# Sections GCC and the assembler make for C++ code and its debug information.
_ALLOWED = re.compile(r"""(
    \.text(\.[\w.$]+)? | \.rodata(\.[\w.$]+)? | \.data(\.[\w.$]+)? | \.bss(\.[\w.$]+)? |
    \.tdata(\.[\w.$]+)? | \.tbss(\.[\w.$]+)? | \.data\.rel\.ro(\.[\w.$]+)? |
    \.rela?\.[\w.$]+ | \.group | \.comment | \.note\.GNU-stack | \.note\.gnu\.property | \.eh_frame |
    \.debug_\w+ | \.symtab | \.strtab | \.shstrtab | \.symtab_shndx | mf_tg |
    )""", re.X)
_LOAD_TIME = re.compile(r"\.(init_array|fini_array|preinit_array|ctors|dtors|init|fini)(\..*)?")


def load_time_code(obj: Path) -> list[str]:
    """What in a relocatable x86-64 object would run at load time or hides where code goes, in words."""
    data = obj.read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return ["the kernel's object is not a 64-bit little-endian ELF file"]
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    names_at = sections[shstrndx][4]

    def name(table_offset: int, at: int) -> str:
        end = data.index(b"\0", table_offset + at)
        return data[table_offset + at:end].decode(errors="replace")

    found = []
    for sh_name, sh_type, flags, _, offset, size, link, _, _, entsize in sections[1:]:
        section = name(names_at, sh_name)
        base = section.removeprefix(".rela").removeprefix(".rel") if section.startswith(".rel") else section
        if sh_type in (_SHT_INIT_ARRAY, _SHT_FINI_ARRAY, _SHT_PREINIT_ARRAY) or _LOAD_TIME.fullmatch(base):
            found.append(f"code run when the library loads or unloads (section {section!r}: a constructor, a "
                         "destructor, or a program-scope variable initialised by a call rather than a constant "
                         "expression)")
        elif not _ALLOWED.fullmatch(section):
            found.append(f"a section of its own ({section[:60]!r}): a kernel's code and data go where the "
                         "compiler puts them")
        elif flags & _SHF_EXECINSTR and not base.startswith(".text"):
            found.append(f"executable data (section {section!r})")
        elif base == "mf_tg" and flags & (_SHF_WRITE | _SHF_EXECINSTR):
            found.append("a writable or executable threadgroup table")
        if sh_type == _SHT_SYMTAB and entsize == 24:
            strings = sections[link][4]
            for i in range(size // 24):
                st_name, info = struct.unpack_from("<IB", data, offset + i * 24)
                if info & 0xF == _STT_GNU_IFUNC:
                    found.append(f"an indirect function ({name(strings, st_name)[:60]}): its resolver runs when the "
                                 "library loads")
    return list(dict.fromkeys(found))
