-- What the bridge last wrote into a lead's mapped fields and price (a hash):
-- an order whose content changed gets one update; one that did not, none.
ALTER TABLE crm_links ADD COLUMN pushed_content TEXT;
