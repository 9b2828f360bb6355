//! Budget windows in a tenant's time zone: the calendar day and the billing period an instant
//! falls in, and when the current ones end.
//!
//! A day is the local calendar date (so a DST day has 23 or 25 hours, and an instant exactly at
//! local midnight belongs to the day it starts). A period starts on the anchor day of a month, or
//! on the month's last day when the month is shorter (anchor 31 → 28 or 29 February, 30 April).

use jiff::civil::Date;
use jiff::tz::TimeZone;
use jiff::Timestamp;

use crate::error::{Error, Result};

/// A tenant's calendar: time zone and billing anchor day (1..=31).
#[derive(Debug, Clone)]
pub struct Calendar {
    tz: TimeZone,
    anchor_day: i8,
}

impl Calendar {
    pub fn new(time_zone: &str, anchor_day: u8) -> Result<Self> {
        let tz = TimeZone::get(time_zone).map_err(|e| Error::BadBudget(format!("time_zone {time_zone:?}: {e}")))?;
        if !(1..=31).contains(&anchor_day) {
            return Err(Error::BadBudget(format!("period_anchor_day = {anchor_day} must be 1..=31")));
        }
        Ok(Calendar { tz, anchor_day: anchor_day as i8 })
    }

    /// The calendar of a tenant without a budget: UTC, periods from the 1st (calendar months).
    pub fn utc_months() -> Self {
        Calendar { tz: TimeZone::UTC, anchor_day: 1 }
    }

    /// The local calendar day of `at`.
    pub fn day(&self, at: Timestamp) -> Date {
        at.to_zoned(self.tz.clone()).date()
    }

    /// The first day of the billing period `at` falls in.
    pub fn period(&self, at: Timestamp) -> Date {
        self.period_of(self.day(at))
    }

    fn anchor_in(&self, year: i16, month: i8) -> Date {
        let first = Date::new(year, month, 1).unwrap_or_default();
        let day = self.anchor_day.min(first.days_in_month());
        Date::new(year, month, day).unwrap_or(first)
    }

    pub fn period_of(&self, day: Date) -> Date {
        let this_month = self.anchor_in(day.year(), day.month());
        if day >= this_month {
            return this_month;
        }
        let (y, m) = if day.month() == 1 { (day.year() - 1, 12) } else { (day.year(), day.month() - 1) };
        self.anchor_in(y, m)
    }

    /// The first day of the period after the one starting on `start`; [`Date::MAX`] past the
    /// last month a date can name (never a day before `start`).
    pub fn next_period(&self, start: Date) -> Date {
        let (y, m) = if start.month() == 12 { (start.year() + 1, 1) } else { (start.year(), start.month() + 1) };
        if Date::new(y, m, 1).is_err() {
            return Date::MAX;
        }
        self.anchor_in(y, m)
    }

    /// The instant the local day `day` starts (after a DST gap at midnight, the first instant
    /// that exists).
    pub fn start_of(&self, day: Date) -> Timestamp {
        day.to_zoned(self.tz.clone()).and_then(|z| z.start_of_day()).map(|z| z.timestamp()).unwrap_or(Timestamp::MAX)
    }

    /// When the day `at` falls in ends.
    pub fn day_ends(&self, at: Timestamp) -> Timestamp {
        self.start_of(self.day(at).tomorrow().unwrap_or(Date::MAX))
    }

    /// When the period `at` falls in ends.
    pub fn period_ends(&self, at: Timestamp) -> Timestamp {
        self.start_of(self.next_period(self.period(at)))
    }

    /// The days after `from`'s own that `[from, until]` reaches: every day starting at or before
    /// `until`. An event of a reservation made at `from` and held until `until` may be charged to
    /// any of them. At most `MAX_LATER_WINDOWS` (a reservation lives at most 24 h: two more days
    /// across a short DST day).
    pub fn later_days(&self, from: Timestamp, until: Timestamp) -> Vec<Date> {
        let mut out = Vec::new();
        let mut day = self.day(from);
        while out.len() < MAX_LATER_WINDOWS {
            match day.tomorrow() {
                Ok(next) if self.start_of(next) <= until => {
                    out.push(next);
                    day = next;
                }
                _ => break,
            }
        }
        out
    }

    /// The periods after `from`'s own that `[from, until]` reaches, as [`Calendar::later_days`].
    pub fn later_periods(&self, from: Timestamp, until: Timestamp) -> Vec<Date> {
        let mut out = Vec::new();
        let mut period = self.period(from);
        while out.len() < MAX_LATER_WINDOWS {
            let next = self.next_period(period);
            if next <= period || self.start_of(next) > until {
                break;
            }
            out.push(next);
            period = next;
        }
        out
    }
}

/// A bound on the windows one reservation spans beyond its first, whatever its TTL.
const MAX_LATER_WINDOWS: usize = 3;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reservation_reaches_the_windows_its_span_touches() {
        let utc = Calendar::new("UTC", 1).unwrap();
        let t = |s: &str| s.parse::<Timestamp>().unwrap();
        let d = |s: &str| s.parse::<Date>().unwrap();
        assert!(utc.later_days(t("2026-11-02T10:00:00Z"), t("2026-11-02T23:59:59Z")).is_empty());
        assert_eq!(utc.later_days(t("2026-11-02T23:59:59Z"), t("2026-11-03T00:00:59Z")), vec![d("2026-11-03")]);
        assert_eq!(utc.later_days(t("2026-11-02T23:59:59Z"), t("2026-11-03T00:00:00Z")), vec![d("2026-11-03")], "the boundary instant belongs to the next day");
        assert_eq!(utc.later_periods(t("2026-11-30T23:59:00Z"), t("2026-12-01T00:01:00Z")), vec![d("2026-12-01")]);
        assert!(utc.later_periods(t("2026-11-29T23:59:00Z"), t("2026-11-30T23:59:00Z")).is_empty());
        // 24 h from 23:30 across a 23-hour day (spring forward) reaches two more days.
        let ny = Calendar::new("America/New_York", 1).unwrap();
        let from = t("2026-03-08T04:30:00Z"); // 2026-03-07 23:30 EST; 03-08 is 23 h long
        assert_eq!(ny.later_days(from, from + jiff::SignedDuration::from_hours(24)), vec![d("2026-03-08"), d("2026-03-09")]);
    }

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn d(s: &str) -> Date {
        s.parse().unwrap()
    }

    #[test]
    fn midnight_belongs_to_the_day_it_starts() {
        let utc = Calendar::new("UTC", 1).unwrap();
        assert_eq!(utc.day(ts("2026-03-01T00:00:00Z")), d("2026-03-01"));
        assert_eq!(utc.day(ts("2026-02-28T23:59:59.999999999Z")), d("2026-02-28"));
        let ny = Calendar::new("America/New_York", 1).unwrap();
        assert_eq!(ny.day(ts("2026-07-01T04:00:00Z")), d("2026-07-01"), "local midnight EDT");
        assert_eq!(ny.day(ts("2026-07-01T03:59:59Z")), d("2026-06-30"));
    }

    #[test]
    fn dst_days_have_23_and_25_hours() {
        let berlin = Calendar::new("Europe/Berlin", 1).unwrap();
        // 2026-03-29: clocks go 02:00 → 03:00 in Berlin.
        let spring = ts("2026-03-29T12:00:00Z");
        let length = berlin.day_ends(spring).duration_since(berlin.start_of(berlin.day(spring)));
        assert_eq!(length.as_secs(), 23 * 3600);
        // 2026-10-25: clocks go 03:00 → 02:00.
        let autumn = ts("2026-10-25T12:00:00Z");
        let length = berlin.day_ends(autumn).duration_since(berlin.start_of(berlin.day(autumn)));
        assert_eq!(length.as_secs(), 25 * 3600);
        // The last instant of the spring day and the first of the next.
        assert_eq!(berlin.day(ts("2026-03-29T21:59:59Z")), d("2026-03-29"));
        assert_eq!(berlin.day(ts("2026-03-29T22:00:00Z")), d("2026-03-30"));
    }

    #[test]
    fn a_dst_gap_at_midnight_starts_the_day_at_the_first_real_instant() {
        // Santiago skips 00:00 → 01:00 when DST begins (2026-09-06).
        let santiago = Calendar::new("America/Santiago", 1).unwrap();
        let start = santiago.start_of(d("2026-09-06"));
        assert_eq!(santiago.day(start), d("2026-09-06"));
        assert_eq!(santiago.day(start - jiff::SignedDuration::from_nanos(1)), d("2026-09-05"));
    }

    #[test]
    fn anchor_31_in_short_months_and_leap_years() {
        let c = Calendar::new("UTC", 31).unwrap();
        assert_eq!(c.period_of(d("2026-02-27")), d("2026-01-31"));
        assert_eq!(c.period_of(d("2026-02-28")), d("2026-02-28"), "February 2026 has 28 days");
        assert_eq!(c.period_of(d("2026-03-30")), d("2026-02-28"));
        assert_eq!(c.period_of(d("2026-03-31")), d("2026-03-31"));
        assert_eq!(c.period_of(d("2028-02-28")), d("2028-01-31"), "2028 is a leap year");
        assert_eq!(c.period_of(d("2028-02-29")), d("2028-02-29"));
        assert_eq!(c.period_of(d("2026-04-30")), d("2026-04-30"));
        assert_eq!(c.next_period(d("2026-01-31")), d("2026-02-28"));
        assert_eq!(c.next_period(d("2026-12-31")), d("2027-01-31"));
    }

    #[test]
    fn month_ends_and_year_ends() {
        let c = Calendar::new("UTC", 1).unwrap();
        assert_eq!(c.period(ts("2026-12-31T23:59:59Z")), d("2026-12-01"));
        assert_eq!(c.period(ts("2027-01-01T00:00:00Z")), d("2027-01-01"));
        assert_eq!(c.period_ends(ts("2026-12-15T00:00:00Z")), ts("2027-01-01T00:00:00Z"));
        let c = Calendar::new("UTC", 15).unwrap();
        assert_eq!(c.period_of(d("2026-01-14")), d("2025-12-15"));
        assert_eq!(c.period_of(d("2026-01-15")), d("2026-01-15"));
        // Leap day is an ordinary day of its period.
        assert_eq!(c.period_of(d("2028-02-29")), d("2028-02-15"));
        let tokyo = Calendar::new("Asia/Tokyo", 1).unwrap();
        assert_eq!(tokyo.period(ts("2026-04-30T15:00:00Z")), d("2026-05-01"), "already May in Tokyo");
    }

    #[test]
    fn bad_settings_are_named() {
        assert!(Calendar::new("Mars/Olympus", 1).unwrap_err().to_string().contains("Mars/Olympus"));
        assert!(Calendar::new("UTC", 0).unwrap_err().to_string().contains("period_anchor_day"));
        // The last period a date can name ends at the end of time, never back at year 0.
        let last = Calendar::new("UTC", 1).unwrap().next_period(jiff::civil::date(9999, 12, 1));
        assert_eq!(last, Date::MAX);
        assert!(Calendar::new("UTC", 32).unwrap_err().to_string().contains("period_anchor_day"));
    }
}
