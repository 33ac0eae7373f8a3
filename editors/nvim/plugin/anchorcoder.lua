-- AnchorCoder: `:AnchorCoder status|enable|disable|pull|install`. Call
-- `require('anchorcoder').setup{}` to start attaching buffers.
if vim.g.loaded_anchorcoder then
  return
end
vim.g.loaded_anchorcoder = true

if vim.fn.has('nvim-0.10') ~= 1 then
  vim.api.nvim_echo({ { 'AnchorCoder needs Neovim 0.10 or later', 'ErrorMsg' } }, true, {})
  return
end

require('anchorcoder.command').create()
