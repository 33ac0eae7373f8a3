-- AnchorCoder: `:AnchorCoder status|enable|disable|pull`. Call
-- `require('anchorcoder').setup{}` to start attaching buffers.
if vim.g.loaded_anchorcoder then
  return
end
vim.g.loaded_anchorcoder = true

if vim.fn.has('nvim-0.10') ~= 1 then
  vim.api.nvim_echo({ { 'AnchorCoder needs Neovim 0.10 or later', 'ErrorMsg' } }, true, {})
  return
end

vim.api.nvim_create_user_command('AnchorCoder', function(args)
  require('anchorcoder').command(args)
end, {
  nargs = '?',
  complete = function()
    return { 'status', 'enable', 'disable', 'pull' }
  end,
  desc = 'AnchorCoder: status, enable, disable, pull',
})
