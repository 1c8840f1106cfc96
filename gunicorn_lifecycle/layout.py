"""The state file's bytes: where each word lies, and what its values mean.

The file is an array of aligned, little-endian 64-bit words, so that every field
can be loaded and stored with one machine access (see :mod:`protocol`)::

    header        80 words   magic, version, capacities, node-wide words, tallies
    generations   24 words each, GENERATIONS of them
    slots          8 words each, one per worker (the capacity chosen at creation)
    turn queue     4 words each, one per thread that may wait for the turn at once
                   (two per worker slot, one per generation; see :mod:`turn`)

Each generation and slot record starts with a sequence word (:mod:`protocol`).
Header words 20 to 31 are reserved: zero, and ignored by this version. The
tallies (from word 32) count, per reason, the generations opened and closed and
the workers lost since the file was made, for monitoring.
"""

from __future__ import annotations

import enum

from .errors import LifecycleError

WORD = 8
MAGIC = int.from_bytes(b"GUNILIFE", "little")
VERSION = 4
GENERATIONS = 32


class H(enum.IntEnum):
    """Header words."""

    MAGIC = 0
    VERSION = 1
    GENERATIONS = 2
    SLOTS = 3
    BOOT_ID = 4  # two words: 16 bytes of /proc/sys/kernel/random/boot_id
    NEXT_GENERATION = 6
    NEXT_TOKEN = 7  # the next slot registration's token (never 0)
    NEXT_SWEEP = 8  # monotonic ns at which a sweep is due: the one word a beat reads
    DIRTY = 9  # word index of the record being written, 0 when none (protocol.Guarded)
    HOLDER_PID = 10  # who holds the state lock, and for what (for timeout messages)
    HOLDER_WHAT = 11
    SERVING = 12  # the ticket that holds the turn to run user callbacks (turn); a futex
    NEXT_TICKET = 13  # the next ticket to give: SERVING == NEXT_TICKET when nobody asked
    SERVED_SINCE = 14  # monotonic ns when SERVING last moved: how long its holder has held
    RESTART_DUE = 15  # a crash closed the last open generation: the next start is "restart"
    LEADER = 16  # the term and the leader's slot in one word: the one word a beat reads (leader)
    LEADER_TOKEN = 17  # the leader slot's registration token when it was elected
    RELEASES = 18  # changes at each release of the state lock (lock): its waiters' futex
    LOCK_WAITERS = 19  # 1 while a process sleeps on RELEASES: a release then wakes it
    OPENED_TALLY = 32  # 16 words: generations opened, indexed by Reason
    CLOSED_TALLY = 48  # 16 words: generations closed, by Reason
    LOST_TALLY = 64  # 16 words: workers lost, by Reason


HEADER_WORDS = 80


class G(enum.IntEnum):
    """Generation record words."""

    SEQ = 0
    STATE = 1  # GenerationState: the commit word of an open or a close
    NUMBER = 2
    OPENED = 3  # Reason it opened with
    CLOSED = 4  # Reason it closed with, once decided
    ANNOUNCED = 5  # 1 from its master_start's delivery to its master_exit's
    MASTER_PID = 6
    MASTER_STARTED = 7
    PIDNS = 8  # the master's pid namespace: liveness is judged only from the same one
    PARENT_PID = 9  # the USR2 parent master (Gunicorn's GUNICORN_PID), else 0
    PARENT_STARTED = 10
    DEPTH = 11  # lineage: a USR2 master's generations come after all of its parent's
    GONE = 12  # workers of it that exited or were lost (for "respawn")
    OPENED_AT = 13  # wall clock, ns since the epoch
    OVERRUN = 14  # ns a heartbeat of its workers may age: interval + failed
    CLOSED_AT = 15  # monotonic ns when its close was decided
    TARGET = 16  # the master's worker count (Gunicorn's num_workers), followed on TTIN/TTOU
    READY = 17  # Readiness
    READY_AT = 18  # monotonic ns when it was found ready


GENERATION_WORDS = 24


class S(enum.IntEnum):
    """Worker slot words."""

    SEQ = 0
    OWNER = 1  # the registration's token while REGISTERED, else 0: a beat's ownership check
    STATE = 2  # SlotState: the commit word of a registration, a loss or a release
    GENERATION = 3
    PID = 4
    STARTED = 5
    HEARTBEAT = 6  # monotonic ns, stored without the lock by its owner; once LOST, when lost
    FLAGS = 7  # Flag bits, and the Reason of a loss in bits 8-15


SLOT_WORDS = 8


class Q(enum.IntEnum):
    """Turn queue entry words: who asked for ticket TICKET (the entry of ticket t is t % size).

    TICKET is stored last when an entry is filled and first (0) when it is cleared.
    """

    TICKET = 0
    PID = 1
    STARTED = 2
    WHAT = 3  # what it runs callbacks for (transaction.WHAT), for messages


QUEUE_WORDS = 4


class GenerationState(enum.IntEnum):
    FREE = 0
    OPEN = 1  # its master serves it
    SUPERSEDED = 2  # a HUP opened a newer one in the same master; it closes with its last worker
    CLOSED = 3  # its close is decided; kept while a slot still refers to it


class Readiness(enum.IntEnum):
    """Whether a generation's booted workers have reached its target (SPEC section 8)."""

    NOT_YET = 0
    READY = 1  # found ready; its master_ready is owed
    TOLD = 2  # its master_ready was delivered


class SlotState(enum.IntEnum):
    FREE = 0
    REGISTERED = 1
    LOST = 2  # reported (or being reported) lost; kept while its process may live


class Flag:
    """Bits of a slot's FLAGS word: plain ints, not an enum.IntFlag, whose operators cost
    microseconds each in loops over every slot."""

    BOOTED = 1  # post_worker_init ran
    COUNTED = 2  # its worker_start was delivered and its end is not yet


class Reason(enum.IntEnum):
    """Every reason the state records, for generations (opened, closed) and losses."""

    NONE = 0
    START = 1
    RESTART = 2
    RELOAD = 3
    UPGRADE = 4
    STOP = 5
    ROLLBACK = 6
    CRASH = 7
    HEARTBEAT = 8
    TIMEOUT = 9

    @property
    def text(self) -> str:
        return self.name.lower()


REASON_SHIFT = 8

# What a process holds the lock or asks for the turn for (HOLDER_WHAT, Q.WHAT): for messages.
WHAT = ("", "master_start", "master_exit", "worker_start", "worker_exit", "worker_lost",
        "register", "booted", "sweep", "resume", "reap", "turn", "exit", "master_ready",
        "target", "leader_start", "leader_stop", "leader")
GENERATIONS_AT = HEADER_WORDS
SLOTS_AT = HEADER_WORDS + GENERATIONS * GENERATION_WORDS


def generation_at(index: int) -> int:
    """Word index of generation record ``index``."""
    return GENERATIONS_AT + index * GENERATION_WORDS


def slot_at(index: int) -> int:
    """Word index of slot ``index``."""
    return SLOTS_AT + index * SLOT_WORDS


LEADER_SLOT_BITS = 20  # slots + 1 < 2**20: the low bits name the leader's slot, the high its term
TERMS = 2**43  # terms wrap (after 8 * 10**12 elections): the word stays within 64 bits


def leader_word(term: int, index: int | None) -> int:
    """The LEADER word: ``term``, and the slot ``index`` that leads (None: no leader)."""
    return term << LEADER_SLOT_BITS | (0 if index is None else index + 1)


def term_of(word: int) -> int:
    return word >> LEADER_SLOT_BITS


def index_of(word: int) -> int | None:
    named = word & (1 << LEADER_SLOT_BITS) - 1
    return named - 1 if named else None


def queue_at(slots: int) -> int:
    """Word index of the turn queue of a file with ``slots`` worker slots."""
    return SLOTS_AT + slots * SLOT_WORDS


def queue_size(slots: int) -> int:
    """Entries in the turn queue: two threads of each worker (its main thread and its
    delivery thread) and one of each generation's master may wait at once."""
    return 2 * slots + GENERATIONS


def entry_at(slots: int, ticket: int) -> int:
    """Word index of the turn queue entry of ``ticket``."""
    return queue_at(slots) + ticket % queue_size(slots) * QUEUE_WORDS


def file_words(slots: int) -> int:
    return queue_at(slots) + queue_size(slots) * QUEUE_WORDS


def file_size(slots: int) -> int:
    """The exact size in bytes of a state file with ``slots`` worker slots."""
    return file_words(slots) * WORD


def new_file(slots: int) -> bytes:
    """The contents of a fresh state file: every record free, generation numbers from 1."""
    data = bytearray(file_size(slots))  # every other word is 0
    for word, value in ((H.MAGIC, MAGIC), (H.VERSION, VERSION), (H.GENERATIONS, GENERATIONS),
                        (H.SLOTS, slots), (H.NEXT_GENERATION, 1), (H.NEXT_TOKEN, 1),
                        (H.SERVING, 1), (H.NEXT_TICKET, 1)):
        data[word * WORD : (word + 1) * WORD] = value.to_bytes(WORD, "little")
    return bytes(data)


def is_cut_short(data: bytes) -> bool:
    """True for a strict prefix of a fresh file: a creation cut short by a crash or a full disk."""
    at = H.SLOTS * WORD
    declared = data[at : at + WORD]  # the capacity, as far as it was written
    slots = int.from_bytes(declared, "little") if len(declared) == WORD else 1
    if not 1 <= slots <= 65536:
        return False
    fresh = bytearray(new_file(slots))
    fresh[at : at + len(declared)] = declared
    return len(data) < len(fresh) and fresh.startswith(data)


def check_header(data: bytes | memoryview, size: int, path: str) -> int:
    """Validate the header of a file of ``size`` bytes and return its slot capacity.

    LifecycleError, naming ``path`` and the fix, if the file is not ours.
    """
    fix = f"move it away or give this instance another state_file; nothing was changed in {path}"
    if size < HEADER_WORDS * WORD:
        raise LifecycleError(f"state file {path} is not a gunicorn_lifecycle state file "
                             f"(only {size} bytes): {fix}")

    def word(index: int) -> int:
        return int.from_bytes(bytes(data[index * WORD : (index + 1) * WORD]), "little")

    if word(H.MAGIC) != MAGIC:
        raise LifecycleError(f"state file {path} is not a gunicorn_lifecycle state file "
                             f"(wrong magic number): {fix}")
    if word(H.VERSION) != VERSION:
        raise LifecycleError(f"state file {path} has format version {word(H.VERSION)}, "
                             f"this gunicorn_lifecycle reads version {VERSION}: stop the servers "
                             f"that use it, then {fix}")
    slots = word(H.SLOTS)
    if word(H.GENERATIONS) != GENERATIONS or not 1 <= slots <= 65536:
        raise LifecycleError(f"state file {path} declares an impossible capacity "
                             f"({word(H.GENERATIONS)} generations, {slots} slots): {fix}")
    if size != file_size(slots):
        raise LifecycleError(f"state file {path} is {size} bytes, but its {slots} slots "
                             f"need {file_size(slots)}: {fix}")
    return slots
