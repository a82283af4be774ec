//! Scripted upstream (Pigeonhole-like) exchanges for the ManageSieve master login.

use super::*;
