from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Chunk(_message.Message):
    __slots__ = ("key", "slice", "dtype", "shape", "offset", "data", "pad")
    KEY_FIELD_NUMBER: _ClassVar[int]
    SLICE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    PAD_FIELD_NUMBER: _ClassVar[int]
    key: str
    slice: int
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    offset: int
    data: bytes
    pad: bytes
    def __init__(self, key: _Optional[str] = ..., slice: _Optional[int] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ..., pad: _Optional[bytes] = ...) -> None: ...

class PutRequest(_message.Message):
    __slots__ = ("optimizer", "chunks", "job", "tables")
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    JOB_FIELD_NUMBER: _ClassVar[int]
    TABLES_FIELD_NUMBER: _ClassVar[int]
    optimizer: str
    chunks: _containers.RepeatedCompositeFieldContainer[Chunk]
    job: str
    tables: str
    def __init__(self, optimizer: _Optional[str] = ..., chunks: _Optional[_Iterable[_Union[Chunk, _Mapping]]] = ..., job: _Optional[str] = ..., tables: _Optional[str] = ...) -> None: ...

class RowBlock(_message.Message):
    __slots__ = ("table", "ids", "values", "dim")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    table: str
    ids: bytes
    values: bytes
    dim: int
    def __init__(self, table: _Optional[str] = ..., ids: _Optional[bytes] = ..., values: _Optional[bytes] = ..., dim: _Optional[int] = ...) -> None: ...

class PutReply(_message.Message):
    __slots__ = ("slices",)
    SLICES_FIELD_NUMBER: _ClassVar[int]
    slices: int
    def __init__(self, slices: _Optional[int] = ...) -> None: ...

class SliceRef(_message.Message):
    __slots__ = ("key", "slice")
    KEY_FIELD_NUMBER: _ClassVar[int]
    SLICE_FIELD_NUMBER: _ClassVar[int]
    key: str
    slice: int
    def __init__(self, key: _Optional[str] = ..., slice: _Optional[int] = ...) -> None: ...

class GetRequest(_message.Message):
    __slots__ = ("group", "step", "slices", "wait_s", "wait_for_put", "shm", "job", "pull")
    GROUP_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    SLICES_FIELD_NUMBER: _ClassVar[int]
    WAIT_S_FIELD_NUMBER: _ClassVar[int]
    WAIT_FOR_PUT_FIELD_NUMBER: _ClassVar[int]
    SHM_FIELD_NUMBER: _ClassVar[int]
    JOB_FIELD_NUMBER: _ClassVar[int]
    PULL_FIELD_NUMBER: _ClassVar[int]
    group: int
    step: int
    slices: _containers.RepeatedCompositeFieldContainer[SliceRef]
    wait_s: float
    wait_for_put: bool
    shm: str
    job: str
    pull: _containers.RepeatedCompositeFieldContainer[RowBlock]
    def __init__(self, group: _Optional[int] = ..., step: _Optional[int] = ..., slices: _Optional[_Iterable[_Union[SliceRef, _Mapping]]] = ..., wait_s: _Optional[float] = ..., wait_for_put: _Optional[bool] = ..., shm: _Optional[str] = ..., job: _Optional[str] = ..., pull: _Optional[_Iterable[_Union[RowBlock, _Mapping]]] = ...) -> None: ...

class GetReply(_message.Message):
    __slots__ = ("step", "chunks", "rows")
    STEP_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    step: int
    chunks: _containers.RepeatedCompositeFieldContainer[Chunk]
    rows: _containers.RepeatedCompositeFieldContainer[RowBlock]
    def __init__(self, step: _Optional[int] = ..., chunks: _Optional[_Iterable[_Union[Chunk, _Mapping]]] = ..., rows: _Optional[_Iterable[_Union[RowBlock, _Mapping]]] = ...) -> None: ...

class UpdateRequest(_message.Message):
    __slots__ = ("group", "step", "process", "workers", "rows", "workers_per_group", "wait_s", "chunks", "worker_groups", "staleness", "group_processes", "epoch", "checkpoint_every", "shm", "metrics", "job", "push", "pull", "shm_slots", "stop_at", "group_timeout_s", "max_groups", "pipelined")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    GROUP_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    PROCESS_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    WORKERS_PER_GROUP_FIELD_NUMBER: _ClassVar[int]
    WAIT_S_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    WORKER_GROUPS_FIELD_NUMBER: _ClassVar[int]
    STALENESS_FIELD_NUMBER: _ClassVar[int]
    GROUP_PROCESSES_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_EVERY_FIELD_NUMBER: _ClassVar[int]
    SHM_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    JOB_FIELD_NUMBER: _ClassVar[int]
    PUSH_FIELD_NUMBER: _ClassVar[int]
    PULL_FIELD_NUMBER: _ClassVar[int]
    SHM_SLOTS_FIELD_NUMBER: _ClassVar[int]
    STOP_AT_FIELD_NUMBER: _ClassVar[int]
    GROUP_TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    MAX_GROUPS_FIELD_NUMBER: _ClassVar[int]
    PIPELINED_FIELD_NUMBER: _ClassVar[int]
    group: int
    step: int
    process: int
    workers: int
    rows: int
    workers_per_group: int
    wait_s: float
    chunks: _containers.RepeatedCompositeFieldContainer[Chunk]
    worker_groups: int
    staleness: int
    group_processes: int
    epoch: int
    checkpoint_every: int
    shm: str
    metrics: _containers.ScalarMap[str, float]
    job: str
    push: _containers.RepeatedCompositeFieldContainer[RowBlock]
    pull: _containers.RepeatedCompositeFieldContainer[RowBlock]
    shm_slots: _containers.RepeatedCompositeFieldContainer[ShmSlot]
    stop_at: int
    group_timeout_s: float
    max_groups: int
    pipelined: bool
    def __init__(self, group: _Optional[int] = ..., step: _Optional[int] = ..., process: _Optional[int] = ..., workers: _Optional[int] = ..., rows: _Optional[int] = ..., workers_per_group: _Optional[int] = ..., wait_s: _Optional[float] = ..., chunks: _Optional[_Iterable[_Union[Chunk, _Mapping]]] = ..., worker_groups: _Optional[int] = ..., staleness: _Optional[int] = ..., group_processes: _Optional[int] = ..., epoch: _Optional[int] = ..., checkpoint_every: _Optional[int] = ..., shm: _Optional[str] = ..., metrics: _Optional[_Mapping[str, float]] = ..., job: _Optional[str] = ..., push: _Optional[_Iterable[_Union[RowBlock, _Mapping]]] = ..., pull: _Optional[_Iterable[_Union[RowBlock, _Mapping]]] = ..., shm_slots: _Optional[_Iterable[_Union[ShmSlot, _Mapping]]] = ..., stop_at: _Optional[int] = ..., group_timeout_s: _Optional[float] = ..., max_groups: _Optional[int] = ..., pipelined: _Optional[bool] = ...) -> None: ...

class ShmSlot(_message.Message):
    __slots__ = ("key", "slice", "grads", "values")
    KEY_FIELD_NUMBER: _ClassVar[int]
    SLICE_FIELD_NUMBER: _ClassVar[int]
    GRADS_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    key: str
    slice: int
    grads: int
    values: int
    def __init__(self, key: _Optional[str] = ..., slice: _Optional[int] = ..., grads: _Optional[int] = ..., values: _Optional[int] = ...) -> None: ...

class UpdateReply(_message.Message):
    __slots__ = ("step", "chunks", "slowest_step", "metrics", "rows", "table_rows", "stop_at")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    STEP_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    SLOWEST_STEP_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    TABLE_ROWS_FIELD_NUMBER: _ClassVar[int]
    STOP_AT_FIELD_NUMBER: _ClassVar[int]
    step: int
    chunks: _containers.RepeatedCompositeFieldContainer[Chunk]
    slowest_step: int
    metrics: _containers.ScalarMap[str, float]
    rows: int
    table_rows: _containers.RepeatedCompositeFieldContainer[RowBlock]
    stop_at: int
    def __init__(self, step: _Optional[int] = ..., chunks: _Optional[_Iterable[_Union[Chunk, _Mapping]]] = ..., slowest_step: _Optional[int] = ..., metrics: _Optional[_Mapping[str, float]] = ..., rows: _Optional[int] = ..., table_rows: _Optional[_Iterable[_Union[RowBlock, _Mapping]]] = ..., stop_at: _Optional[int] = ...) -> None: ...

class DescribeRequest(_message.Message):
    __slots__ = ("digest",)
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    digest: bool
    def __init__(self, digest: _Optional[bool] = ...) -> None: ...

class SliceInfo(_message.Message):
    __slots__ = ("key", "slice", "dtype", "shape", "version", "nbytes")
    KEY_FIELD_NUMBER: _ClassVar[int]
    SLICE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    key: str
    slice: int
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    version: int
    nbytes: int
    def __init__(self, key: _Optional[str] = ..., slice: _Optional[int] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., version: _Optional[int] = ..., nbytes: _Optional[int] = ...) -> None: ...

class TableInfo(_message.Message):
    __slots__ = ("name", "rows", "dim", "rows_held", "bytes", "optimizer", "updates", "rows_touched", "rows_admitted", "rows_expired", "rows_evicted", "ids_waiting")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    ROWS_HELD_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    UPDATES_FIELD_NUMBER: _ClassVar[int]
    ROWS_TOUCHED_FIELD_NUMBER: _ClassVar[int]
    ROWS_ADMITTED_FIELD_NUMBER: _ClassVar[int]
    ROWS_EXPIRED_FIELD_NUMBER: _ClassVar[int]
    ROWS_EVICTED_FIELD_NUMBER: _ClassVar[int]
    IDS_WAITING_FIELD_NUMBER: _ClassVar[int]
    name: str
    rows: int
    dim: int
    rows_held: int
    bytes: int
    optimizer: str
    updates: int
    rows_touched: int
    rows_admitted: int
    rows_expired: int
    rows_evicted: int
    ids_waiting: int
    def __init__(self, name: _Optional[str] = ..., rows: _Optional[int] = ..., dim: _Optional[int] = ..., rows_held: _Optional[int] = ..., bytes: _Optional[int] = ..., optimizer: _Optional[str] = ..., updates: _Optional[int] = ..., rows_touched: _Optional[int] = ..., rows_admitted: _Optional[int] = ..., rows_expired: _Optional[int] = ..., rows_evicted: _Optional[int] = ..., ids_waiting: _Optional[int] = ...) -> None: ...

class GroupInfo(_message.Message):
    __slots__ = ("group", "step", "pending_workers", "pending_processes", "reports", "gone")
    GROUP_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    PENDING_WORKERS_FIELD_NUMBER: _ClassVar[int]
    PENDING_PROCESSES_FIELD_NUMBER: _ClassVar[int]
    REPORTS_FIELD_NUMBER: _ClassVar[int]
    GONE_FIELD_NUMBER: _ClassVar[int]
    group: int
    step: int
    pending_workers: int
    pending_processes: _containers.RepeatedScalarFieldContainer[int]
    reports: _containers.RepeatedCompositeFieldContainer[ProcessReport]
    gone: bool
    def __init__(self, group: _Optional[int] = ..., step: _Optional[int] = ..., pending_workers: _Optional[int] = ..., pending_processes: _Optional[_Iterable[int]] = ..., reports: _Optional[_Iterable[_Union[ProcessReport, _Mapping]]] = ..., gone: _Optional[bool] = ...) -> None: ...

class ProcessReport(_message.Message):
    __slots__ = ("process", "updates", "age_s")
    PROCESS_FIELD_NUMBER: _ClassVar[int]
    UPDATES_FIELD_NUMBER: _ClassVar[int]
    AGE_S_FIELD_NUMBER: _ClassVar[int]
    process: int
    updates: int
    age_s: float
    def __init__(self, process: _Optional[int] = ..., updates: _Optional[int] = ..., age_s: _Optional[float] = ...) -> None: ...

class DescribeReply(_message.Message):
    __slots__ = ("shard", "shards", "slices", "groups", "bytes", "rpc_counts", "optimizer", "updates_applied", "uptime_s", "epoch", "checkpoint_steps", "host", "digest", "job", "tables", "link_socket", "link_port", "link_id", "resharded_from", "resharded_step")
    class RpcCountsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    SHARD_FIELD_NUMBER: _ClassVar[int]
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    SLICES_FIELD_NUMBER: _ClassVar[int]
    GROUPS_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    RPC_COUNTS_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    UPDATES_APPLIED_FIELD_NUMBER: _ClassVar[int]
    UPTIME_S_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_STEPS_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    JOB_FIELD_NUMBER: _ClassVar[int]
    TABLES_FIELD_NUMBER: _ClassVar[int]
    LINK_SOCKET_FIELD_NUMBER: _ClassVar[int]
    LINK_PORT_FIELD_NUMBER: _ClassVar[int]
    LINK_ID_FIELD_NUMBER: _ClassVar[int]
    RESHARDED_FROM_FIELD_NUMBER: _ClassVar[int]
    RESHARDED_STEP_FIELD_NUMBER: _ClassVar[int]
    shard: int
    shards: int
    slices: _containers.RepeatedCompositeFieldContainer[SliceInfo]
    groups: _containers.RepeatedCompositeFieldContainer[GroupInfo]
    bytes: int
    rpc_counts: _containers.ScalarMap[str, int]
    optimizer: str
    updates_applied: int
    uptime_s: float
    epoch: int
    checkpoint_steps: _containers.RepeatedScalarFieldContainer[int]
    host: str
    digest: str
    job: str
    tables: _containers.RepeatedCompositeFieldContainer[TableInfo]
    link_socket: str
    link_port: int
    link_id: str
    resharded_from: int
    resharded_step: int
    def __init__(self, shard: _Optional[int] = ..., shards: _Optional[int] = ..., slices: _Optional[_Iterable[_Union[SliceInfo, _Mapping]]] = ..., groups: _Optional[_Iterable[_Union[GroupInfo, _Mapping]]] = ..., bytes: _Optional[int] = ..., rpc_counts: _Optional[_Mapping[str, int]] = ..., optimizer: _Optional[str] = ..., updates_applied: _Optional[int] = ..., uptime_s: _Optional[float] = ..., epoch: _Optional[int] = ..., checkpoint_steps: _Optional[_Iterable[int]] = ..., host: _Optional[str] = ..., digest: _Optional[str] = ..., job: _Optional[str] = ..., tables: _Optional[_Iterable[_Union[TableInfo, _Mapping]]] = ..., link_socket: _Optional[str] = ..., link_port: _Optional[int] = ..., link_id: _Optional[str] = ..., resharded_from: _Optional[int] = ..., resharded_step: _Optional[int] = ...) -> None: ...

class RestoreRequest(_message.Message):
    __slots__ = ("step", "epoch")
    STEP_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    step: int
    epoch: int
    def __init__(self, step: _Optional[int] = ..., epoch: _Optional[int] = ...) -> None: ...

class RestoreReply(_message.Message):
    __slots__ = ("step", "epoch")
    STEP_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    step: int
    epoch: int
    def __init__(self, step: _Optional[int] = ..., epoch: _Optional[int] = ...) -> None: ...
