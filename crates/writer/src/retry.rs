//! Retrying writes: error classification (transient, blocking, or about a row),
//! exponential backoff with jitter, and a circuit breaker that stops hammering a dead
//! server. Pure logic: the caller sleeps.
//!
//! The three kinds decide what happens to a batch: a *transient* failure (network,
//! timeout, overload) is retried with backoff; a *blocking* one is not about the data
//! (credentials, rights, a missing table or bucket, a coordination failure): it is retried
//! the same way, but the service also reports itself blocked (readiness 503, a metric), and
//! nothing is dead-lettered or committed; only an error *about a row* (a value the server
//! cannot parse or store) sends that row to the DLQ.

use std::time::Duration;

/// What a failed write means, and so what the writer does with the batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Connection refused/reset, timeouts, server overload: retry the batch.
    Retryable,
    /// Not about the data: the store cannot take any write until an operator (or the
    /// server itself) fixes `BlockReason`. Retry the batch; never dead-letter it.
    Blocking(BlockReason),
    /// The server refuses the data itself (parse, type or size errors): isolate the rows
    /// and dead-letter the ones it refuses.
    Row,
}

impl ErrorKind {
    /// The `kind` label of the error and retry metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Retryable => "retryable",
            ErrorKind::Blocking(_) => "blocking",
            ErrorKind::Row => "row",
        }
    }
}

/// Why a sink is blocked: the bounded `reason` label of `pulse_writer_blocked`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum BlockReason {
    /// Unknown user, wrong or missing password, bad S3 keys or signature.
    Authentication,
    /// The user may not write there (database/table rights, S3 403).
    AccessDenied,
    /// The user, the server or the table is read-only.
    ReadOnly,
    /// The table does not exist (dropped, migrations not applied).
    UnknownTable,
    /// The database does not exist.
    UnknownDatabase,
    /// The S3 bucket does not exist.
    MissingBucket,
    /// The table's columns do not match the rows (schema drift).
    Schema,
    /// ZooKeeper/Keeper or replica coordination failed.
    Coordination,
    /// Too many parts: merges cannot keep up, inserts are refused until they do.
    TooManyParts,
    /// Another server-side error that is not about a row (unknown code, client config).
    Server,
}

impl BlockReason {
    /// Every reason, in label order (to reset the gauges of the others).
    pub const ALL: [BlockReason; 10] = [
        BlockReason::Authentication,
        BlockReason::AccessDenied,
        BlockReason::ReadOnly,
        BlockReason::UnknownTable,
        BlockReason::UnknownDatabase,
        BlockReason::MissingBucket,
        BlockReason::Schema,
        BlockReason::Coordination,
        BlockReason::TooManyParts,
        BlockReason::Server,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            BlockReason::Authentication => "authentication",
            BlockReason::AccessDenied => "access_denied",
            BlockReason::ReadOnly => "read_only",
            BlockReason::UnknownTable => "unknown_table",
            BlockReason::UnknownDatabase => "unknown_database",
            BlockReason::MissingBucket => "missing_bucket",
            BlockReason::Schema => "schema",
            BlockReason::Coordination => "coordination",
            BlockReason::TooManyParts => "too_many_parts",
            BlockReason::Server => "server",
        }
    }
}

/// ClickHouse exception codes that mean "try again later" (names from ClickHouse's
/// `ErrorCodes.cpp`; codes never change between releases).
const RETRYABLE_CODES: &[u32] = &[
    159, // TIMEOUT_EXCEEDED
    173, // CANNOT_ALLOCATE_MEMORY
    202, // TOO_MANY_SIMULTANEOUS_QUERIES
    209, // SOCKET_TIMEOUT
    210, // NETWORK_ERROR
    236, // ABORTED
    241, // MEMORY_LIMIT_EXCEEDED
    319, // UNKNOWN_STATUS_OF_INSERT (the insert is retried; the keys collapse a repeat)
    394, // QUERY_WAS_CANCELLED
    425, // SYSTEM_ERROR
];

/// ClickHouse exception codes about the value of a row (what RowBinary input or a
/// column's type can refuse): that row goes to the DLQ.
const ROW_CODES: &[u32] = &[
    3,   // UNEXPECTED_END_OF_FILE
    6,   // CANNOT_PARSE_TEXT
    19,  // SIZE_OF_FIXED_STRING_DOESNT_MATCH
    25,  // CANNOT_PARSE_ESCAPE_SEQUENCE
    26,  // CANNOT_PARSE_QUOTED_STRING
    27,  // CANNOT_PARSE_INPUT_ASSERTION_FAILED
    32,  // ATTEMPT_TO_READ_AFTER_EOF (18.16: a RowBinary array longer than the data)
    33,  // CANNOT_READ_ALL_DATA (18.16: a truncated RowBinary value)
    38,  // CANNOT_PARSE_DATE
    41,  // CANNOT_PARSE_DATETIME
    53,  // TYPE_MISMATCH
    69,  // ARGUMENT_OUT_OF_BOUND
    70,  // CANNOT_CONVERT_TYPE
    72,  // CANNOT_PARSE_NUMBER
    117, // INCORRECT_DATA
    128, // TOO_LARGE_ARRAY_SIZE
    130, // CANNOT_READ_ARRAY_FROM_TEXT
    131, // TOO_LARGE_STRING_SIZE
    190, // SIZES_OF_ARRAYS_DOESNT_MATCH
    321, // VALUE_IS_OUT_OF_RANGE_OF_DATA_TYPE
    349, // CANNOT_INSERT_NULL_IN_ORDINARY_COLUMN
    376, // CANNOT_PARSE_UUID
    407, // DECIMAL_OVERFLOW
    441, // CANNOT_PARSE_DOMAIN_VALUE_FROM_STRING
    467, // CANNOT_PARSE_BOOL
    469, // VIOLATED_CONSTRAINT
];

/// ClickHouse exception codes that are not about the data, and why they block.
fn blocking_code(code: u32) -> Option<BlockReason> {
    use BlockReason as R;
    Some(match code {
        192 // UNKNOWN_USER
        | 193 // WRONG_PASSWORD
        | 194 // REQUIRED_PASSWORD
        | 195 // IP_ADDRESS_NOT_ALLOWED
        | 516 // AUTHENTICATION_FAILED (current releases; 18.16 answers 192/193)
        => R::Authentication,
        291 // DATABASE_ACCESS_DENIED (18.16: allow_databases)
        | 497 // ACCESS_DENIED (current releases: GRANTs)
        => R::AccessDenied,
        164 // READONLY (a readonly user or profile)
        | 495 // ACCESS_STORAGE_READONLY
        => R::ReadOnly,
        60 // UNKNOWN_TABLE
        | 218 // TABLE_IS_DROPPED
        => R::UnknownTable,
        81 => R::UnknownDatabase, // UNKNOWN_DATABASE
        8 // THERE_IS_NO_COLUMN
        | 10 // NOT_FOUND_COLUMN_IN_BLOCK
        | 16 // NO_SUCH_COLUMN_IN_TABLE
        | 20 // NUMBER_OF_COLUMNS_DOESNT_MATCH
        | 47 // UNKNOWN_IDENTIFIER
        => R::Schema,
        225 // NO_ZOOKEEPER
        | 242 // TABLE_IS_READ_ONLY (a replicated table that lost ZooKeeper)
        | 244 // UNEXPECTED_ZOOKEEPER_ERROR
        | 285 // TOO_FEW_LIVE_REPLICAS
        | 286 // UNSATISFIED_QUORUM_FOR_PREVIOUS_WRITE
        | 289 // REPLICA_IS_NOT_IN_QUORUM
        | 999 // KEEPER_EXCEPTION
        => R::Coordination,
        252 => R::TooManyParts, // TOO_MANY_PARTS
        _ => return None,
    })
}

/// Classifies a `clickhouse` client error.
pub fn classify(err: &clickhouse::error::Error) -> ErrorKind {
    use clickhouse::error::Error as E;
    match err {
        E::Network(_) | E::TimedOut | E::Compression(_) | E::Decompression(_) => {
            ErrorKind::Retryable
        }
        E::BadResponse(text) => classify_message(text),
        // Serializing this row failed on the client: about the row.
        E::Custom(_)
        | E::SequenceMustHaveLength
        | E::InvalidUtf8Encoding(_)
        | E::InvalidTagEncoding(_)
        | E::VariantDiscriminatorIsOutOfBound(_) => ErrorKind::Row,
        // The client's settings or the table's schema do not fit.
        E::InvalidParams(_)
        | E::Unsupported(_)
        | E::SchemaMismatch(_)
        | E::InvalidColumnsHeader(_) => ErrorKind::Blocking(BlockReason::Schema),
        _ => classify_message(&err.to_string()),
    }
}

/// The exception code of a ClickHouse error message: `Code: 60, e.displayText() = …`
/// (18.16), `Code: 60. DB::Exception: …` (current releases), or `Code: 60` alone (what
/// the `clickhouse` crate makes of an empty body with an `X-ClickHouse-Exception-Code`).
pub fn exception_code(text: &str) -> Option<u32> {
    text.split("Code: ")
        .nth(1)
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse::<u32>().ok())
}

/// Classifies a server message by its `Code: N`; without a code, by the HTTP status the
/// client reports for an empty error body (`401 Unauthorized`), else as transient.
pub fn classify_message(text: &str) -> ErrorKind {
    match exception_code(text) {
        // A batch whose rows span more partitions than one insert may create (current
        // releases' max_partitions_per_insert_block): the rows, one by one, are fine.
        Some(252) if text.contains("Too many partitions for single INSERT block") => ErrorKind::Row,
        Some(c) if RETRYABLE_CODES.contains(&c) => ErrorKind::Retryable,
        Some(c) if ROW_CODES.contains(&c) => ErrorKind::Row,
        Some(c) => ErrorKind::Blocking(blocking_code(c).unwrap_or(BlockReason::Server)),
        None if text.starts_with("401 ") => ErrorKind::Blocking(BlockReason::Authentication),
        None if text.starts_with("403 ") => ErrorKind::Blocking(BlockReason::AccessDenied),
        None => ErrorKind::Retryable,
    }
}

/// Exponential backoff with full jitter and a cap; after `open_after` consecutive failures
/// the breaker is open and waits `open_wait` between probes.
#[derive(Debug, Clone)]
pub struct Backoff {
    pub base: Duration,
    pub cap: Duration,
    pub open_after: u32,
    pub open_wait: Duration,
    failures: u32,
    seed: u64,
}

impl Backoff {
    pub fn new(base: Duration, cap: Duration, open_after: u32, open_wait: Duration) -> Self {
        Self {
            base,
            cap,
            open_after,
            open_wait,
            failures: 0,
            seed: 0x9E37_79B9_7F4A_7C15,
        }
    }

    /// Records a failure and returns how long to wait before the next attempt.
    pub fn failure(&mut self) -> Duration {
        self.failures = self.failures.saturating_add(1);
        if self.is_open() {
            return self.open_wait;
        }
        let exp = self
            .base
            .saturating_mul(1u32.checked_shl(self.failures.min(20)).unwrap_or(u32::MAX))
            .min(self.cap);
        // xorshift jitter in [exp/2, exp].
        self.seed ^= self.seed << 13;
        self.seed ^= self.seed >> 7;
        self.seed ^= self.seed << 17;
        let half = exp / 2;
        let jitter_ms = u64::try_from(half.as_millis()).unwrap_or(u64::MAX);
        let extra = if jitter_ms == 0 {
            0
        } else {
            self.seed % (jitter_ms + 1)
        };
        half + Duration::from_millis(extra)
    }

    pub fn success(&mut self) {
        self.failures = 0;
    }

    /// The circuit is open: the server failed `open_after` times in a row.
    pub fn is_open(&self) -> bool {
        self.failures >= self.open_after
    }

    pub fn failures(&self) -> u32 {
        self.failures
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use clickhouse::error::Error as E;

    /// What the `clickhouse` crate (0.15) returns for a server exception: the HTTP status
    /// is not 200, so it reads the whole (uncompressed) body, trims it and wraps it in
    /// `BadResponse` (`response.rs`, `collect_bad_response`). The bodies are ClickHouse
    /// 18.16's, captured from the test server.
    fn server_exception(body: &str) -> E {
        E::BadResponse(body.trim().to_owned())
    }

    /// Answers one HTTP request on a fresh port with ClickHouse 18.16's response to a
    /// failed insert (status, headers and chunked body as captured with `curl -i`), and
    /// returns the error the `clickhouse` client makes of it.
    async fn insert_answered_with(status: &str, body: &str) -> E {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let response = format!(
            "HTTP/1.1 {status}\r\nConnection: Keep-Alive\r\nContent-Type: text/plain; charset=UTF-8\r\n\
             X-ClickHouse-Server-Display-Name: vm\r\nTransfer-Encoding: chunked\r\n\r\n\
             {:x}\r\n{body}\r\n0\r\n\r\n",
            body.len()
        );
        let server = tokio::spawn(async move {
            let (mut conn, _) = listener.accept().await.unwrap();
            // Read the whole request (headers and chunked body) before answering.
            let mut req = Vec::new();
            let mut buf = [0u8; 4096];
            while !req.ends_with(b"0\r\n\r\n") {
                let n = conn.read(&mut buf).await.unwrap();
                if n == 0 {
                    break;
                }
                req.extend_from_slice(&buf[..n]);
            }
            conn.write_all(response.as_bytes()).await.unwrap();
            conn.shutdown().await.unwrap();
        });
        let client = pulse_platform::clickhouse::ClickHouseConfig {
            url: format!("http://{addr}"),
            ..Default::default()
        }
        .client();
        let row = pulse_storage::rows::FreshnessRow {
            stage: "s".into(),
            kafka_partition: 0,
            last_event_time_ms: 1,
            last_ingest_ms: 1,
            written_at_ms: 1,
        };
        let mut insert = client
            .insert::<pulse_storage::rows::FreshnessRow>("freshness")
            .await
            .unwrap();
        insert.write(&row).await.unwrap();
        let err = insert.end().await.unwrap_err();
        server.await.unwrap();
        err
    }

    #[tokio::test]
    async fn the_clickhouse_client_reports_a_server_exception_with_its_code() {
        let body = "Code: 60, e.displayText() = DB::Exception: Table pulse.freshness doesn't exist., e.what() = DB::Exception\n";
        let err = insert_answered_with("404 Not Found", body).await;
        assert!(
            matches!(&err, E::BadResponse(text) if text == body.trim()),
            "{err:?}"
        );
        assert_eq!(
            classify(&err),
            ErrorKind::Blocking(BlockReason::UnknownTable)
        );
        let body = "Code: 193, e.displayText() = DB::Exception: Wrong password for user default, e.what() = DB::Exception\n";
        let err = insert_answered_with("401 Unauthorized", body).await;
        assert_eq!(
            classify(&err),
            ErrorKind::Blocking(BlockReason::Authentication)
        );
        let body = "Code: 33, e.displayText() = DB::Exception: Cannot read all data. Bytes read: 2. Bytes expected: 5.: (at row 1)\n";
        let err = insert_answered_with("500 Internal Server Error", body).await;
        assert_eq!(classify(&err), ErrorKind::Row);
    }

    #[test]
    fn errors_that_are_not_about_the_data_block() {
        let cases = [
            (
                "Code: 60, e.displayText() = DB::Exception: Table w4.nosuch doesn't exist., e.what() = DB::Exception\n",
                BlockReason::UnknownTable,
            ),
            (
                "Code: 81, e.displayText() = DB::Exception: Database nosuchdb doesn't exist, e.what() = DB::Exception\n",
                BlockReason::UnknownDatabase,
            ),
            (
                "Code: 193, e.displayText() = DB::Exception: Wrong password for user default, e.what() = DB::Exception\n",
                BlockReason::Authentication,
            ),
            (
                "Code: 192, e.displayText() = DB::Exception: Unknown user nobody, e.what() = DB::Exception\n",
                BlockReason::Authentication,
            ),
            (
                "Code: 291, e.displayText() = DB::Exception: Access denied to database w4 for user limited, e.what() = DB::Exception\n",
                BlockReason::AccessDenied,
            ),
            (
                "Code: 164, e.displayText() = DB::Exception: Cannot insert into table in readonly mode, e.what() = DB::Exception\n",
                BlockReason::ReadOnly,
            ),
            (
                "Code: 16, e.displayText() = DB::Exception: No such column zz in table t, e.what() = DB::Exception\n",
                BlockReason::Schema,
            ),
            (
                "Code: 225, e.displayText() = DB::Exception: Can't create replicated table without ZooKeeper, e.what() = DB::Exception\n",
                BlockReason::Coordination,
            ),
            // Current releases' wording.
            (
                "Code: 516. DB::Exception: default: Authentication failed: password is incorrect, or there is no user with such name. (AUTHENTICATION_FAILED) (version 24.8.4.13 (official build))",
                BlockReason::Authentication,
            ),
            (
                "Code: 497. DB::Exception: pulse: Not enough privileges. To execute this query, it's necessary to have the grant INSERT ON pulse.events. (ACCESS_DENIED) (version 24.8.4.13 (official build))",
                BlockReason::AccessDenied,
            ),
            (
                "Code: 999. Coordination::Exception: Connection loss. (KEEPER_EXCEPTION) (version 24.8.4.13 (official build))",
                BlockReason::Coordination,
            ),
            (
                "Code: 252. DB::Exception: Too many parts (300). Merges are processing significantly slower than inserts. (TOO_MANY_PARTS) (version 24.8.4.13 (official build))",
                BlockReason::TooManyParts,
            ),
            // A code no list names is not assumed to be about a row.
            (
                "Code: 1002. DB::Exception: something new. (UNKNOWN_EXCEPTION)",
                BlockReason::Server,
            ),
            // An empty body: the crate reports the X-ClickHouse-Exception-Code header...
            ("Code: 60", BlockReason::UnknownTable),
            // ...or, without it, the status.
            ("401 Unauthorized", BlockReason::Authentication),
            ("403 Forbidden", BlockReason::AccessDenied),
        ];
        for (body, reason) in cases {
            assert_eq!(
                classify(&server_exception(body)),
                ErrorKind::Blocking(reason),
                "{body}"
            );
        }
        assert_eq!(
            classify(&E::SchemaMismatch("column x".into())),
            ErrorKind::Blocking(BlockReason::Schema)
        );
    }

    #[test]
    fn errors_about_a_row_go_to_the_dlq() {
        for body in [
            "Code: 33, e.displayText() = DB::Exception: Cannot read all data. Bytes read: 2. Bytes expected: 5.: (at row 1)\n",
            "Code: 32, e.displayText() = DB::Exception: Attempt to read after eof, e.what() = DB::Exception\n",
            "Code: 27, e.displayText() = DB::Exception: Cannot parse input: expected \\t before: x, e.what() = DB::Exception",
            "Code: 53. DB::Exception: Type mismatch in IN or VALUES section. (TYPE_MISMATCH)",
            "Code: 252. DB::Exception: Too many partitions for single INSERT block (more than 100). (TOO_MANY_PARTS)",
        ] {
            assert_eq!(classify(&server_exception(body)), ErrorKind::Row, "{body}");
        }
        assert_eq!(
            classify(&E::Custom("invalid value".into())),
            ErrorKind::Row,
            "serializing the row failed"
        );
    }

    #[test]
    fn network_timeouts_and_overload_are_transient() {
        assert_eq!(classify(&E::TimedOut), ErrorKind::Retryable);
        assert_eq!(
            classify(&E::Network("connection reset by peer".into())),
            ErrorKind::Retryable
        );
        for body in [
            "Code: 241, e.displayText() = DB::Exception: Memory limit (for query) exceeded: would use 8.00 GiB, e.what() = DB::Exception",
            "Code: 202. DB::Exception: Too many simultaneous queries. (TOO_MANY_SIMULTANEOUS_QUERIES)",
            "Code: 159. DB::Exception: Timeout exceeded. (TIMEOUT_EXCEEDED)",
            "502 Bad Gateway",
            "503 Service Unavailable",
        ] {
            assert_eq!(
                classify(&server_exception(body)),
                ErrorKind::Retryable,
                "{body}"
            );
        }
    }

    #[test]
    fn every_block_reason_has_its_own_label() {
        let labels: std::collections::BTreeSet<&str> =
            BlockReason::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(labels.len(), BlockReason::ALL.len());
    }

    #[test]
    fn backoff_grows_with_jitter_up_to_the_cap_then_the_breaker_opens() {
        let mut b = Backoff::new(
            Duration::from_millis(100),
            Duration::from_secs(2),
            6,
            Duration::from_secs(10),
        );
        let waits: Vec<Duration> = (0..5).map(|_| b.failure()).collect();
        for (i, w) in waits.iter().enumerate() {
            let exp =
                (Duration::from_millis(100) * 2u32.pow(i as u32 + 1)).min(Duration::from_secs(2));
            assert!(
                *w >= exp / 2 && *w <= exp,
                "attempt {i}: {w:?} not in [{:?}, {exp:?}]",
                exp / 2
            );
        }
        assert!(!b.is_open());
        assert_eq!(
            b.failure(),
            Duration::from_secs(10),
            "open circuit waits the probe interval"
        );
        assert!(b.is_open());
        b.success();
        assert!(!b.is_open() && b.failures() == 0);
    }
}
