//! Export windows: fixed UTC days, and which of them are due (pure).

use std::collections::HashMap;

use chrono::{DateTime, Duration, NaiveDate, Utc};

/// One day of one export.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Window {
    pub endpoint: String,
    pub day: NaiveDate,
}

impl Window {
    pub fn start(&self) -> DateTime<Utc> {
        self.day.and_hms_opt(0, 0, 0).unwrap_or_default().and_utc()
    }

    pub fn end(&self) -> DateTime<Utc> {
        self.start() + Duration::days(1)
    }

    /// `date_since` / `date_until` as the Logs API takes them (inclusive).
    pub fn api_range(&self) -> (String, String) {
        (
            format!("{} 00:00:00", self.day.format("%Y-%m-%d")),
            format!("{} 23:59:59", self.day.format("%Y-%m-%d")),
        )
    }
}

impl std::fmt::Display for Window {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.endpoint, self.day)
    }
}

/// The windows to fetch now: every day from `start` to the last complete day
/// (yesterday) not done yet, plus the last `refetch_days` complete days whose last
/// fetch is a day old or more (late data). `done` maps each done window to when it
/// was fetched. Oldest first.
pub fn due(
    endpoints: &[String],
    start: NaiveDate,
    now: DateTime<Utc>,
    refetch_days: u32,
    done: &HashMap<Window, DateTime<Utc>>,
) -> Vec<Window> {
    let last_complete = now.date_naive() - Duration::days(1);
    let refetch_from = last_complete - Duration::days(i64::from(refetch_days) - 1);
    let mut windows = Vec::new();
    let mut day = start;
    while day <= last_complete {
        for endpoint in endpoints {
            let window = Window {
                endpoint: endpoint.clone(),
                day,
            };
            let wanted = match done.get(&window) {
                None => true,
                Some(fetched_at) => refetch_days > 0 && day >= refetch_from && now - *fetched_at >= Duration::days(1),
            };
            if wanted {
                windows.push(window);
            }
        }
        day += Duration::days(1);
    }
    windows
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(s: &str) -> NaiveDate {
        NaiveDate::parse_from_str(s, "%Y-%m-%d").expect("date")
    }

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).expect("time").with_timezone(&Utc)
    }

    #[test]
    fn windows_are_whole_days_in_api_form() {
        let w = Window {
            endpoint: "events".into(),
            day: d("2024-03-01"),
        };
        assert_eq!(
            w.api_range(),
            ("2024-03-01 00:00:00".into(), "2024-03-01 23:59:59".into())
        );
        assert_eq!(w.end() - w.start(), Duration::days(1));
        assert_eq!(w.to_string(), "events 2024-03-01");
    }

    #[test]
    fn due_windows_resume_after_the_last_done_and_refetch_recent_days_daily() {
        let endpoints = vec!["events".to_owned()];
        let now = at("2024-03-10T06:00:00Z");
        let all = due(&endpoints, d("2024-03-01"), now, 3, &HashMap::new());
        assert_eq!(all.len(), 9, "up to yesterday, today is not complete");
        assert_eq!(all.last().map(|w| w.day), Some(d("2024-03-09")));

        let mut done = HashMap::new();
        for w in &all {
            done.insert(w.clone(), at("2024-03-10T05:00:00Z"));
        }
        assert!(
            due(&endpoints, d("2024-03-01"), now, 3, &done).is_empty(),
            "fetched an hour ago"
        );
        let next_day = at("2024-03-11T06:00:00Z");
        let refetched: Vec<NaiveDate> = due(&endpoints, d("2024-03-01"), next_day, 3, &done)
            .iter()
            .map(|w| w.day)
            .collect();
        assert_eq!(
            refetched,
            [d("2024-03-08"), d("2024-03-09"), d("2024-03-10")],
            "the two most recent done days again, and the new day"
        );
        assert_eq!(
            due(&endpoints, d("2024-03-01"), next_day, 0, &done).len(),
            1,
            "no refetch"
        );
    }
}
