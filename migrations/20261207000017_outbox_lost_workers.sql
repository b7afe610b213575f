-- Attempts lost because the process running them died (SIGKILL, OOM, the
-- machine going away): its replica stopped heartbeating before the job's lease
-- ran out. Such a loss is not the job's failure and does not count toward
-- `failures` (a daemon killed again and again while a slow job runs would
-- otherwise dead-letter a healthy job); a job whose worker dies this often
-- (three times the failure limit) is dead-lettered as one that may be killing
-- its process.
ALTER TABLE outbox_jobs ADD COLUMN lost_workers INTEGER NOT NULL DEFAULT 0;
