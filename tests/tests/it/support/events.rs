//! Sample events: [`event`] starts a `pulse.events.v1.Event` with what every event has (id,
//! user, event time, schema version 1, a page view) and the builder adds what a test cares
//! about; [`Sample::build`] gives the protobuf message, [`Sample::json`] the JSON that
//! ingest's HTTP API takes for it.

use pulse_contracts::pb::events::v1 as ev;
use serde_json::{Map, Value, json};

/// An event under construction (see [`event`]).
#[derive(Debug, Clone)]
pub struct Sample(ev::Event);

/// A page view of `user` at `event_time_ms` (epoch ms) with no page, session, properties,
/// producer trace id, source or ingest information.
pub fn event(id: impl Into<String>, user: impl Into<String>, event_time_ms: i64) -> Sample {
    Sample(ev::Event {
        event_id: id.into(),
        schema_version: 1,
        event_type: "page_view".into(),
        key: Some(ev::EventKey {
            user_id: user.into(),
            session_id: String::new(),
        }),
        payload: Some(ev::Payload::default()),
        metadata: Some(ev::Metadata {
            event_timestamp_ms: event_time_ms,
            ..Default::default()
        }),
        ingest: None,
    })
}

impl Sample {
    fn payload(&mut self) -> &mut ev::Payload {
        self.0.payload.get_or_insert_with(Default::default)
    }

    fn metadata(&mut self) -> &mut ev::Metadata {
        self.0.metadata.get_or_insert_with(Default::default)
    }

    /// On `page`.
    pub fn page(mut self, page: impl Into<String>) -> Self {
        self.payload().page = page.into();
        self
    }

    /// A purchase of `amount_micros` millionths of `currency`.
    pub fn purchase(mut self, currency: &str, amount_micros: i64) -> Self {
        self.0.event_type = "purchase".into();
        let p = self.payload();
        p.currency = currency.into();
        p.amount_micros = Some(amount_micros);
        self
    }

    /// In the client's session `session_id`.
    pub fn session(mut self, session_id: impl Into<String>) -> Self {
        if let Some(k) = self.0.key.as_mut() {
            k.session_id = session_id.into();
        }
        self
    }

    /// Coming from `referrer`.
    pub fn referrer(mut self, referrer: impl Into<String>) -> Self {
        self.payload().referrer = referrer.into();
        self
    }

    /// With property `name` = `value`.
    pub fn property(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.payload().properties.insert(name.into(), value.into());
        self
    }

    /// Sent by `source` (e.g. `web`).
    pub fn source(mut self, source: impl Into<String>) -> Self {
        self.metadata().source = source.into();
        self
    }

    /// With the producer's own trace id `trace_id` in its metadata.
    pub fn trace_id(mut self, trace_id: impl Into<String>) -> Self {
        self.metadata().trace_id = trace_id.into();
        self
    }

    /// As ingest stored it: received over HTTP at `at_ms` from the API key named `source`.
    pub fn ingested(mut self, at_ms: i64, source: impl Into<String>) -> Self {
        self.0.ingest = Some(ev::IngestInfo {
            ingest_timestamp_ms: at_ms,
            ingest_source: source.into(),
            protocol: "http".into(),
        });
        self
    }

    /// The protobuf message.
    pub fn build(self) -> ev::Event {
        self.0
    }

    /// The event as a client posts it to ingest's HTTP API: the fields that are set, the
    /// amount as a decimal string, the event time as epoch ms (ingest information is
    /// ingest's to add, so it is left out).
    pub fn json(&self) -> Value {
        let e = &self.0;
        let mut key = Map::new();
        let mut payload = Map::new();
        let mut metadata = Map::new();
        if let Some(k) = &e.key {
            key.insert("user_id".into(), json!(k.user_id));
            if !k.session_id.is_empty() {
                key.insert("session_id".into(), json!(k.session_id));
            }
        }
        if let Some(p) = &e.payload {
            for (name, v) in [
                ("page", &p.page),
                ("referrer", &p.referrer),
                ("currency", &p.currency),
            ] {
                if !v.is_empty() {
                    payload.insert(name.into(), json!(v));
                }
            }
            if let Some(a) = p.amount_micros {
                payload.insert("amount".into(), json!(decimal(a)));
            }
            if !p.properties.is_empty() {
                payload.insert("properties".into(), json!(p.properties));
            }
        }
        if let Some(m) = &e.metadata {
            metadata.insert("event_timestamp".into(), json!(m.event_timestamp_ms));
            for (name, v) in [("source", &m.source), ("trace_id", &m.trace_id)] {
                if !v.is_empty() {
                    metadata.insert(name.into(), json!(v));
                }
            }
        }
        json!({
            "event_id": e.event_id,
            "schema_version": e.schema_version,
            "event_type": e.event_type,
            "key": key,
            "payload": payload,
            "metadata": metadata,
        })
    }
}

/// `micros` millionths as a decimal string without trailing zeros: 19_990_000 is `19.99`.
fn decimal(micros: i64) -> String {
    let sign = if micros < 0 { "-" } else { "" };
    let (units, frac) = (
        micros.unsigned_abs() / 1_000_000,
        micros.unsigned_abs() % 1_000_000,
    );
    if frac == 0 {
        format!("{sign}{units}")
    } else {
        let frac = format!("{frac:06}");
        format!("{sign}{units}.{}", frac.trim_end_matches('0'))
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::event;

    #[test]
    fn the_json_form_has_the_fields_that_are_set_and_the_amount_as_a_decimal() {
        let e = event("e1", "u1", 1_764_000_000_000)
            .purchase("EUR", 19_990_000)
            .session("s1")
            .property("plan", "pro")
            .source("web")
            .ingested(1_764_000_000_500, "shop");
        assert_eq!(
            e.json(),
            json!({
                "event_id": "e1",
                "schema_version": 1,
                "event_type": "purchase",
                "key": { "user_id": "u1", "session_id": "s1" },
                "payload": { "currency": "EUR", "amount": "19.99", "properties": { "plan": "pro" } },
                "metadata": { "event_timestamp": 1_764_000_000_000_i64, "source": "web" },
            })
        );
        let built = e.build();
        assert_eq!(built.payload.unwrap().amount_micros, Some(19_990_000));
        assert_eq!(built.ingest.unwrap().ingest_timestamp_ms, 1_764_000_000_500);
        assert_eq!(super::decimal(5_000_000), "5");
        assert_eq!(super::decimal(1_000_001), "1.000001");
    }
}
