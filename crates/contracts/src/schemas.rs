//! The protobuf schemas of Kafka record values, as registered with the schema registry
//! (subject `<topic>-value`, type PROTOBUF). The `.proto` sources are embedded at build
//! time from `proto/`, so the registered text is exactly what the code was generated from.

use prost::Message;
use prost_types::FileDescriptorSet;

use crate::topics;

/// One `.proto` file that defines record values.
#[derive(Debug, Clone, Copy)]
pub struct ProtoFile {
    /// Import path, e.g. `pulse/events/v1/event.proto`.
    pub path: &'static str,
    /// The file's text.
    pub source: &'static str,
}

pub const EVENTS: ProtoFile = ProtoFile {
    path: "pulse/events/v1/event.proto",
    source: include_str!("../../../proto/pulse/events/v1/event.proto"),
};

pub const AGGREGATES: ProtoFile = ProtoFile {
    path: "pulse/aggregates/v1/aggregates.proto",
    source: include_str!("../../../proto/pulse/aggregates/v1/aggregates.proto"),
};

/// A record-value message and the file it lives in.
#[derive(Debug, Clone, Copy)]
pub struct RecordSchema {
    pub file: ProtoFile,
    /// Fully qualified message name, e.g. `pulse.events.v1.Event`.
    pub full_name: &'static str,
}

pub const EVENT: RecordSchema = RecordSchema {
    file: EVENTS,
    full_name: "pulse.events.v1.Event",
};
pub const USER_WINDOW_ACTIVITY: RecordSchema = RecordSchema {
    file: AGGREGATES,
    full_name: "pulse.aggregates.v1.UserWindowActivity",
};
pub const SESSION: RecordSchema = RecordSchema {
    file: AGGREGATES,
    full_name: "pulse.aggregates.v1.Session",
};

impl RecordSchema {
    /// The message's index path within its file, for the wire format
    /// (`[n]` for the n-th top-level message). `None` if the name is not in the file.
    pub fn message_indexes(&self) -> Option<Vec<i32>> {
        let fds = FileDescriptorSet::decode(crate::FILE_DESCRIPTOR_SET).ok()?;
        let file = fds.file.iter().find(|f| f.name() == self.file.path)?;
        let local = self
            .full_name
            .strip_prefix(file.package())?
            .strip_prefix('.')?;
        let pos = file.message_type.iter().position(|m| m.name() == local)?;
        Some(vec![i32::try_from(pos).ok()?])
    }
}

/// Which schema each Confluent-framed topic carries (the DLQ keeps original bytes and
/// has no schema).
pub const TOPIC_SCHEMAS: &[(&str, RecordSchema)] = &[
    (topics::EVENTS, EVENT),
    (topics::EVENTS_LATE, EVENT),
    (topics::USER_ACTIVITY, USER_WINDOW_ACTIVITY),
    (topics::SESSIONS, SESSION),
];

/// The registry subject of a topic's values (topic-name strategy).
pub fn value_subject(topic: &str) -> String {
    format!("{topic}-value")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb;

    #[test]
    fn message_indexes_follow_the_proto_file_order() {
        assert_eq!(EVENT.message_indexes(), Some(vec![0]));
        assert_eq!(USER_WINDOW_ACTIVITY.message_indexes(), Some(vec![1]));
        assert_eq!(SESSION.message_indexes(), Some(vec![2]));
        let missing = RecordSchema {
            file: EVENTS,
            full_name: "pulse.events.v1.Nope",
        };
        assert_eq!(missing.message_indexes(), None);
    }

    #[test]
    fn event_round_trips_through_protobuf_and_the_wire_format() {
        let event = pb::events::v1::Event {
            event_id: "e-1".into(),
            schema_version: 1,
            event_type: "purchase".into(),
            key: Some(pb::events::v1::EventKey {
                user_id: "u-1".into(),
                session_id: "s-1".into(),
            }),
            payload: Some(pb::events::v1::Payload {
                page: "/checkout".into(),
                currency: "EUR".into(),
                amount_micros: Some(12_340_000),
                properties: [("ip".to_string(), "203.0.113.0".to_string())].into(),
                ..Default::default()
            }),
            metadata: Some(pb::events::v1::Metadata {
                event_timestamp_ms: 1_764_000_000_000,
                trace_id: String::new(),
                source: "web".into(),
            }),
            ingest: Some(pb::events::v1::IngestInfo {
                ingest_timestamp_ms: 1_764_000_000_100,
                ingest_source: "shop".into(),
                protocol: "http".into(),
            }),
        };
        let framed =
            crate::wire::frame(3, &EVENT.message_indexes().unwrap(), &event.encode_to_vec());
        let back = crate::wire::unframe(&framed).unwrap();
        assert_eq!(back.schema_id, 3);
        let decoded = pb::events::v1::Event::decode(back.payload).unwrap();
        assert_eq!(decoded, event);
    }

    #[test]
    fn absent_amount_differs_from_zero() {
        let mut p = pb::events::v1::Payload::default();
        let none = pb::events::v1::Payload::decode(p.encode_to_vec().as_slice()).unwrap();
        assert_eq!(none.amount_micros, None);
        p.amount_micros = Some(0);
        let zero = pb::events::v1::Payload::decode(p.encode_to_vec().as_slice()).unwrap();
        assert_eq!(zero.amount_micros, Some(0));
    }

    #[test]
    fn aggregates_round_trip() {
        let a = pb::aggregates::v1::UserWindowActivity {
            user_id: "u".into(),
            window_start_ms: 60_000,
            window_end_ms: 120_000,
            page_views: 2,
            revenue: vec![pb::aggregates::v1::CurrencyAmount {
                currency: "USD".into(),
                amount_micros: 5,
            }],
            version: 9,
            r#final: true,
            ..Default::default()
        };
        let back =
            pb::aggregates::v1::UserWindowActivity::decode(a.encode_to_vec().as_slice()).unwrap();
        assert_eq!(a, back);
    }

    /// The aggregates as registered before `rules_version` (fields 14 and 12) existed: the
    /// text of `fixtures/aggregates-v1-before-rules-version.proto`, in part.
    #[derive(Clone, PartialEq, prost::Message)]
    struct ActivityBefore {
        #[prost(string, tag = "1")]
        user_id: String,
        #[prost(uint64, tag = "8")]
        event_count: u64,
        #[prost(uint64, tag = "11")]
        version: u64,
        #[prost(int64, tag = "13")]
        last_ingest_ms: i64,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    struct SessionBefore {
        #[prost(string, tag = "1")]
        session_id: String,
        #[prost(uint64, tag = "8")]
        version: u64,
        #[prost(string, repeated, tag = "11")]
        merged_session_ids: Vec<String>,
    }

    #[test]
    fn records_from_before_rules_versions_decode_with_an_empty_one_and_back() {
        use pb::aggregates::v1::{Session, UserWindowActivity};
        let old = ActivityBefore {
            user_id: "u".into(),
            event_count: 3,
            version: 9,
            last_ingest_ms: 77,
        };
        let new = UserWindowActivity::decode(old.encode_to_vec().as_slice()).unwrap();
        assert_eq!(new.rules_version, "");
        assert_eq!(
            (
                new.user_id.as_str(),
                new.event_count,
                new.version,
                new.last_ingest_ms
            ),
            ("u", 3, 9, 77)
        );
        // An old reader skips the new field.
        let stamped = UserWindowActivity {
            rules_version: "2026-12-rc1+b6320f5f73b1".into(),
            ..new
        };
        assert_eq!(
            ActivityBefore::decode(stamped.encode_to_vec().as_slice()).unwrap(),
            old
        );
        let old = SessionBefore {
            session_id: "s".into(),
            version: 4,
            merged_session_ids: vec!["s0".into()],
        };
        let new = Session::decode(old.encode_to_vec().as_slice()).unwrap();
        assert_eq!((new.rules_version.as_str(), new.version), ("", 4));
        let stamped = Session {
            rules_version: "b6320f5f73b1".into(),
            ..new
        };
        assert_eq!(
            SessionBefore::decode(stamped.encode_to_vec().as_slice()).unwrap(),
            old
        );
    }

    #[test]
    fn the_fixture_of_the_previous_aggregates_differs_only_by_the_rules_version() {
        let before = include_str!("../fixtures/aggregates-v1-before-rules-version.proto");
        assert!(!before.contains("rules_version"));
        assert!(AGGREGATES.source.contains("string rules_version = 14;"));
        assert!(AGGREGATES.source.contains("string rules_version = 12;"));
        // Every line of the previous schema is still there, in order.
        let mut now = AGGREGATES.source.lines();
        for line in before.lines() {
            assert!(now.any(|l| l == line), "{line:?} is gone or moved");
        }
    }
}
